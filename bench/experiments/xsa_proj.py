"""XSA's backward in the epilogue of the output projection's input-gradient matmul (fused_kernels.
xsa_proj_grad_kernel) against what it replaces: cuBLAS go = gz @ w, then the XSA backward kernel reading go back.
At the h100 micro-batch (128 x 2048 = 262,144 tokens, 8 heads in 4 KV groups of 2, head dim 64), bf16; errors
of both against an fp32 reference. Each time is the mean of 10 back-to-back launches (median of 20 such).
    python bench/experiments/xsa_proj.py [--tokens 262144]"""
import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import fused_kernels as fk  # noqa: E402
import train_gpt as tg  # noqa: E402
from fused_mlp import timed10  # noqa: E402


@triton.jit
def xsa_bwd_kernel(go_ptr, y_ptr, v_ptr, gy_ptr, gv_ptr, R, G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr):
    """What the backward used before (8d0883a's xsa_kernel with GRAD=1): XSA's backward reading go back."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < R
    d = tl.arange(0, D)
    y_off = r[:, None, None] * (G * D) + tl.arange(0, G)[None, :, None] * D + d[None, None, :]
    go = tl.load(go_ptr + y_off, mask=ok[:, None, None]).to(tl.float32)
    y = tl.load(y_ptr + y_off, mask=ok[:, None, None]).to(tl.float32)
    v = tl.load(v_ptr + r[:, None] * D + d[None, :], mask=ok[:, None]).to(tl.float32)
    gy, gv = fk.xsa_grad(go, y, v, BLOCK_R, D)
    tl.store(gy_ptr + y_off, gy.to(tl.bfloat16), mask=ok[:, None, None])
    tl.store(gv_ptr + r[:, None] * D + d[None, :], gv.to(tl.bfloat16), mask=ok[:, None])


def xsa_bwd(go, y, v):
    G, D = y.shape[-2:]
    gy, gv, R = torch.empty_like(y), torch.empty_like(v), v.numel() // D
    xsa_bwd_kernel[(triton.cdiv(R, 64),)](go, y, v, gy, gv, R, G=G, D=D, BLOCK_R=64, num_warps=4)
    return gy, gv

CONFIGS = [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 32, 8, 4),
           (32, 64, 4, 3), (64, 32, 4, 4), (128, 64, 8, 4), (64, 64, 8, 3), (64, 32, 8, 4), (64, 64, 8, 2),
           (64, 128, 8, 2)]  # BLOCK_M, BLOCK_K, warps, stages


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=262144)
    args = ap.parse_args()
    M, KV, G, D = args.tokens, 4, 2, 64
    N = KV * G * D
    torch.manual_seed(0)
    dt = torch.bfloat16
    y = torch.randn(M, KV, G, D, device="cuda", dtype=dt)
    v = torch.randn(M, KV, D, device="cuda", dtype=dt)
    w = (torch.randn(N, N, device="cuda") / N ** 0.5).to(dt)
    gz = torch.randn(M, N, device="cuda", dtype=dt)
    print(f"device:{torch.cuda.get_device_name(0)} torch:{torch.__version__} triton:{fk.triton.__version__} M={M}")
    yy, vv = y.float().requires_grad_(), v.float().requires_grad_()
    (tg.xsa(yy[None], vv[None]).reshape(M, N) @ w.float().t()).backward(gz.float())
    err = lambda a, r: ((a.float() - r).norm() / r.norm()).item()

    t_mm = timed10(lambda: gz @ w)
    go = gz @ w
    t_x = timed10(lambda: xsa_bwd(go, y, v))
    gy, gv = xsa_bwd(gz @ w, y, v)
    print(f"now: cuBLAS gz @ w {t_mm:.3f} ms + XSA backward kernel {t_x:.3f} ms = {t_mm + t_x:.3f} ms; "
          f"err gy {err(gy, yy.grad):.1e} gv {err(gv, vv.grad):.1e}")
    print("| BLOCK_M | BLOCK_K | warps | stages | fused ms | vs now ms | err gy | err gv |")
    print("|---|---|---|---|---|---|---|---|")
    for bm, bk, nw, ns in CONFIGS:
        blocks = dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=nw, num_stages=ns)
        gy, gv = torch.full_like(y, float("nan")), torch.full_like(v, float("nan"))
        try:
            t = timed10(lambda: fk.launch_xsa_proj_grad(gz, w, y, v, gy, gv, blocks))
        except Exception as e:  # e.g. out of shared memory or registers
            print(f"| {bm} | {bk} | {nw} | {ns} | failed: {type(e).__name__} |", flush=True)
            continue
        print(f"| {bm} | {bk} | {nw} | {ns} | {t:.3f} | {t - t_mm - t_x:+.3f} | {err(gy, yy.grad):.1e} | "
              f"{err(gv, vv.grad):.1e} |", flush=True)


if __name__ == "__main__":
    main()
