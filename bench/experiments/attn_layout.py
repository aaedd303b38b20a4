"""Does the memory layout handed to SDPA's cuDNN backend change its cost? The h100 step gives it q/k/v as
[B,T,H,D] tensors viewed as [B,H,T,D] (the q/k/v matmul's natural layout), and the gradient at its output in
that layout too. cuDNN's backward also runs three helper kernels (dO.O row sums, dQ fp32->bf16, the GQA head
reduction: 33 ms of a 1xH100 step in bench/profile_step.py). Here, at the training shape, in one process:
q/k/v and dO each either BTHD-viewed or BHTD-contiguous, and K/V either shared (enable_gqa) or pre-expanded
to the query heads (the expansion itself not timed). Forward, backward and the kernels' split of one call.
    python bench/experiments/attn_layout.py [--batch 96]"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlp_fusion import timed  # noqa: E402


def tensor(layout, B, T, H, D):
    if layout == "bthd":
        return torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    return torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)


def variant(qkv_layout, do_layout, expand, B, T=2048, H=8, KV=4, D=64):
    q = tensor(qkv_layout, B, T, H, D).requires_grad_()
    k = tensor(qkv_layout, B, T, H if expand else KV, D).requires_grad_()
    v = tensor(qkv_layout, B, T, H if expand else KV, D).requires_grad_()
    do = tensor(do_layout, B, T, H, D)

    def fwd():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not expand)

    y = fwd()

    def bwd():
        torch.autograd.grad(y, (q, k, v), do, retain_graph=True)

    t_f, t_b = timed(fwd, 10), timed(bwd, 10)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        bwd()
        torch.cuda.synchronize()
    kern = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name.split("(")[0].replace("void ", "")
            name = "bprop main" if "bprop" in name else name.split("::")[-1][:28]
            kern[name] = kern.get(name, 0.0) + e.device_time_total / 1000
    return t_f, t_b, tuple(y.stride()), kern


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=96)
    a = ap.parse_args()
    B, T, H, D = a.batch, 2048, 8, 64
    flops = 4 * B * H * D * T * T / 2  # causal forward
    print(f"device:{torch.cuda.get_device_name(0)} torch:{torch.__version__} cudnn:{torch.backends.cudnn.version()} "
          f"B={B} T={T} H={H} KV=4 D={D}")
    print("| q/k/v | dO | K/V | fwd ms | fwd TFLOP/s | bwd ms | output strides | backward kernels (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for expand in (False, True):
        for qkv_layout in ("bthd", "bhtd"):
            for do_layout in ("bthd", "bhtd"):
                try:
                    t_f, t_b, st, kern = variant(qkv_layout, do_layout, expand, B)
                except Exception as e:
                    print(f"| {qkv_layout} | {do_layout} | {'expanded' if expand else 'gqa'} | failed: {type(e).__name__}: {str(e)[:100]} |")
                    continue
                ks = ", ".join(f"{n} {t:.3f}" for n, t in sorted(kern.items(), key=lambda kv: -kv[1]))
                print(f"| {qkv_layout} | {do_layout} | {'expanded' if expand else 'gqa'} | {t_f:.3f} | "
                      f"{flops / t_f / 1e9:.0f} | {t_b:.3f} | {st} | {ks} |", flush=True)


if __name__ == "__main__":
    main()
