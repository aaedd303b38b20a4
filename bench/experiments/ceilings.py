"""The two ceilings of the GPU at hand (bench/README's method): device memory bandwidth (a 2 GiB copy,
bytes read + written) and bf16 matmul rate (8192^3 and the MLP's up-projection shape).
    python bench/experiments/ceilings.py"""
import torch


def timed(fn, n=20):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def main():
    a = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a))
    print(f"copy 2 GiB bf16: {ms:.3f} ms -> {2 * a.numel() * 2 / ms / 1e9:.2f} TB/s (read+write)")
    x, y = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = timed(lambda: x @ y)
    print(f"bf16 mm 8192^3: {ms:.3f} ms -> {2 * 8192 ** 3 / ms / 1e9:.0f} TFLOP/s")
    x, w = torch.randn(98304, 512, device="cuda", dtype=torch.bfloat16), torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: x @ w.T)
    print(f"bf16 mm 98304x512x2048 (MLP up): {ms:.3f} ms -> {2 * 98304 * 512 * 2048 / ms / 1e9:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
