"""Experiment: cuDNN's attention under the environment switches found in torch 2.11's and cuDNN 9.19's binaries
(TORCH_CUDNN_USE_HEURISTIC_MODE_B, CUDNN_FRONTEND_ATTN_DP_WORKSPACE_LIMIT), at this model's shape. Each setting
runs in its own process (they are read once), twice, interleaved; prints forward and backward ms and the kernels.

  python bench/experiments/cudnn_knobs.py [--batch 128] [--iters 20]
"""
import argparse
import json
import os
import subprocess
import sys

SETTINGS = {
    "default": {},
    "heuristic mode B": {"TORCH_CUDNN_USE_HEURISTIC_MODE_B": "1"},
    "dP workspace 16 GiB": {"CUDNN_FRONTEND_ATTN_DP_WORKSPACE_LIMIT": str(16 << 30)},
    "dP workspace 0": {"CUDNN_FRONTEND_ATTN_DP_WORKSPACE_LIMIT": "0"},
    "mode B + dP 16 GiB": {"TORCH_CUDNN_USE_HEURISTIC_MODE_B": "1", "CUDNN_FRONTEND_ATTN_DP_WORKSPACE_LIMIT": str(16 << 30)},
}


def child(batch: int, iters: int) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    T, H, KV, D = 2048, 8, 4, 64
    torch.manual_seed(0)
    dev = torch.device("cuda")
    q = (torch.randn(batch, H, T, D, device=dev) * 1.5).bfloat16().requires_grad_()
    k = torch.randn(batch, KV, T, D, device=dev).bfloat16().requires_grad_()
    v = torch.randn(batch, KV, T, D, device=dev).bfloat16().requires_grad_()
    do = torch.randn(batch, H, T, D, device=dev).bfloat16() * 1e-2

    def fwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def ev():
        return torch.cuda.Event(enable_timing=True)
    o = fwd()
    g0 = torch.autograd.grad(o, (q, k, v), do)
    torch.cuda.synchronize()
    tf = tb = 0.0
    for _ in range(iters):
        a, b, c = ev(), ev(), ev()
        a.record()
        o = fwd()
        b.record()
        torch.autograd.grad(o, (q, k, v), do)
        c.record()
        torch.cuda.synchronize()
        tf += a.elapsed_time(b)
        tb += b.elapsed_time(c)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        o = fwd()
        torch.autograd.grad(o, (q, k, v), do)
        torch.cuda.synchronize()
    kernels = sorted({e.name[:90] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
    print(json.dumps({"fwd": tf / iters, "bwd": tb / iters, "kernels": kernels,
                      "grad_sum": float(sum(g.float().abs().sum() for g in g0))}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(args.batch, args.iters)
    results: dict = {}
    for rnd in range(2):
        for name, env in (SETTINGS.items() if rnd == 0 else reversed(SETTINGS.items())):
            r = subprocess.run([sys.executable, __file__, "--child", "--batch", str(args.batch), "--iters", str(args.iters)],
                               env={**os.environ, **env}, capture_output=True, text=True)
            line = [l for l in r.stdout.splitlines() if l.startswith("{")]
            if not line:
                print(f"{name}: failed\n{r.stderr[-1500:]}")
                continue
            results.setdefault(name, []).append(json.loads(line[-1]))
    print(f"| setting (B={args.batch}, T=2048, 8 q / 4 kv heads, hd 64) | forward ms | backward ms | |grad| sum |")
    print("|---|---|---|---|")
    for name, rs in results.items():
        fw, bw = (" / ".join(f"{r[key]:.3f}" for r in rs) for key in ("fwd", "bwd"))
        print(f"| {name} | {fw} | {bw} | {rs[0]['grad_sum']:.6g} |")
    for name, rs in results.items():
        print(f"{name}: kernels {rs[0]['kernels']}")


if __name__ == "__main__":
    main()
