"""Is a matmul with the LeakyReLU^2 fused into its epilogue worth building? One MLP block's forward+backward
at the h100 micro-batch shape (98,304 tokens, 512 -> 2048 -> 512, bf16), compiled two ways in one process:
  default      inductor: cuBLAS matmuls plus separate Triton elementwise kernels (what training uses)
  autotune     mode="max-autotune-no-cudagraphs": Triton matmul templates, which can fuse the activation
               (and its derivative) into the matmul epilogue
    python bench/experiments/mlp_fusion.py"""
import time

import torch
import torch.nn.functional as F


def mlp(x, w_up, w_down):
    return F.linear(F.leaky_relu(F.linear(x, w_up), 0.5).square(), w_down)


def timed(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[n // 2]


def main():
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(98304, 512, device=dev, dtype=dt, requires_grad=True)
    w_up = (torch.randn(2048, 512, device=dev, dtype=dt) / 512 ** 0.5).requires_grad_()
    w_down = (torch.randn(512, 2048, device=dev, dtype=dt) / 2048 ** 0.5).requires_grad_()
    g = torch.randn(98304, 512, device=dev, dtype=dt)
    ref = None
    for mode in ("default", "max-autotune-no-cudagraphs"):
        torch._dynamo.reset()
        for t in (x, w_up, w_down):  # the previous mode's timing loop accumulated into .grad
            t.grad = None
        f = torch.compile(mlp, dynamic=False, fullgraph=True, mode=None if mode == "default" else mode)
        t0 = time.perf_counter()
        out = f(x, w_up, w_down)
        out.backward(g)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        grads = [t.grad.clone() for t in (x, w_up, w_down)]
        for t in (x, w_up, w_down):
            t.grad = None

        def step():
            f(x, w_up, w_down).backward(g)
        ms = timed(step)
        fwd_ms = timed(lambda: f(x, w_up, w_down).detach())
        if ref is None:
            ref = [out.float()] + [t.float() for t in grads]
            err = 0.0
        else:
            err = max(((a.float() - b).norm() / b.norm()).item() for a, b in zip([out] + grads, ref))
        print(f"{mode:<28} compile {compile_s:6.1f} s  fwd {fwd_ms:.3f} ms  fwd+bwd {ms:.3f} ms  "
              f"max rel. diff vs default {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
