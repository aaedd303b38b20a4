"""Where a training step's GPU time goes: attention backends side by side, then the top kernels of one
compiled step of a preset (torch.profiler).  python bench/profile_step.py --data-path .proxy [--preset 3090]"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_gpt as tg  # noqa: E402
from bench_train import setup, train_step_fn  # noqa: E402


def time_fn(fn, iters=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1000


def attention_variants(B=48, T=2048, H=8, KV=4, D=64):
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run(backends, gqa):
        def f():
            with sdpa_kernel(backends):
                kk, vv = (k, v) if gqa else (k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1))
                y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                y.sum().backward()
        return f
    rows = []
    for name, be, gqa in [("default+enable_gqa", [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], True), ("flash+enable_gqa", [SDPBackend.FLASH_ATTENTION], True),
                          ("cudnn+enable_gqa", [SDPBackend.CUDNN_ATTENTION], True), ("efficient+enable_gqa", [SDPBackend.EFFICIENT_ATTENTION], True),
                          ("flash+repeat_kv", [SDPBackend.FLASH_ATTENTION], False), ("cudnn+repeat_kv", [SDPBackend.CUDNN_ATTENTION], False)]:
        try:
            rows.append((name, f"{time_fn(run(be, gqa)):.2f}"))
        except Exception as e:
            rows.append((name, f"unsupported ({type(e).__name__})"))
    print(f"attention fwd+bwd B={B} T={T} H={H} KV={KV} D={D} (one layer, one micro-batch):")
    for n, t in rows:
        print(f"  {n:<24} {t} ms")


OUR_KERNELS = ("mlp_act_mm", "xsa_kernel", "xsa_proj_grad_kernel", "qk_inputs_kernel", "values_kernel")  # fused_kernels.py


def gpu_idle(prof, show=12):
    """Gaps between GPU activities of the profiled step: time the GPU waited for the host to launch work."""
    ev = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda t: t[0])
    gaps, end, prev = [], ev[0][1], ev[0][2]
    for s, e, n in ev[1:]:
        if s > end:
            gaps.append((s - end, prev, n))
        if e > end:
            end, prev = e, n
    span = (end - ev[0][0]) / 1000
    idle = sum(g for g, _, _ in gaps) / 1000
    big = [g for g in gaps if g[0] > 20]
    print(f"GPU timeline of one step: span {span:.1f} ms, idle {idle:.1f} ms ({100 * idle / span:.1f}%) in {len(gaps)} gaps, "
          f"{len(big)} over 20 us totalling {sum(g for g, _, _ in big) / 1000:.1f} ms; largest:")
    for g, a, b in sorted(gaps, reverse=True)[:show]:
        print(f"  {g / 1000:7.2f} ms  after {a[:60]}  before {b[:60]}")


def profile(preset, data_path, top):
    d, cfg, model, fwd, opt, loader = setup(preset, data_path)  # environment overrides apply (RESIDUAL_DTYPE=...)

    step = train_step_fn(fwd, opt, loader, d)
    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(3)
        torch.cuda.synchronize()
    gpu_idle(prof)
    kernels = {}  # GPU kernels only: op-level rows would count each kernel's time again
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t, n = kernels.get(e.name, (0.0, 0))
            kernels[e.name] = (t + e.device_time_total / 1000, n + 1)
    print(f"top {top} GPU kernels of one step (ms, calls):")
    for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {t:8.2f} {n:5d}  {name[:150]}")
    cats = {"matmul": 0.0, "attention": 0.0, "fused_kernels.py": 0.0, "triton fused": 0.0, "other": 0.0}
    for name, (t, _) in kernels.items():
        k = name.lower()
        cat = ("attention" if any(w in k for w in ("sdpa", "attention", "flash", "fmha", "cudnn")) else
               "matmul" if any(w in k for w in ("nvjet", "gemm", "cutlass", "sm90_xmma")) else
               "fused_kernels.py" if k.startswith(OUR_KERNELS) else
               "triton fused" if k.startswith("triton") else "other")
        cats[cat] += t
    total = sum(cats.values())
    print("GPU kernel time of one step by category (ms):", {k: round(v, 1) for k, v in cats.items()}, f"total {total:.1f}")
    t = time.perf_counter()
    tg.forward_backward(fwd, loader.next_step(), d)
    torch.cuda.synchronize()
    t_fb = time.perf_counter() - t
    t = time.perf_counter()
    opt.step(5, 1.0)
    torch.cuda.synchronize()
    t_opt = time.perf_counter() - t
    print(f"step split: forward+backward {t_fb * 1000:.1f} ms, optimizer (Muon+Adam) {t_opt * 1000:.1f} ms")
    tg.forward_backward(fwd, loader.next_step(), d)  # fresh gradients, then the optimizer step alone under the profiler
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        opt.step(6, 1.0)
        torch.cuda.synchronize()
        t_opt = time.perf_counter() - t
    gpu = sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1000
    n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"optimizer step under the profiler: wall {t_opt * 1000:.1f} ms, GPU kernels {gpu:.1f} ms in {n} launches")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-path", default=".proxy")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--preset", default="h100")
    a = ap.parse_args()
    if not a.skip_attention:
        attention_variants()
    profile(a.preset, a.data_path, a.top)
