"""Can the fused MLP kernel overlap its epilogue (DRAM-bound stores of h and a, or the load of h and store of the
gradient) with matmul work, without warp specialization? Every persistent program runs mainloop, epilogue,
mainloop, ... in lockstep with all others, so the whole GPU alternates between compute-bound and DRAM-bound
phases. Here some programs sleep (PTX nanosleep) before their first tile, so that at any moment part of the GPU
is in its epilogue while the rest multiplies:
  - 1 program per SM, odd programs delayed (SMs out of phase with each other; DRAM shared by fewer at a time);
  - 2 programs per SM, the second wave delayed (ping-pong on one SM: one program's epilogue under the other's
    matmul).
At the h100 training shape (196,608 tokens, 512 -> 2048 and the hidden gradient), against fused_kernels' kernel
and cuBLAS alone. Each time is the mean of 10 back-to-back launches (median of 20 such).
    python bench/experiments/mlp_desync.py [--tokens 196608]"""
import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import fused_kernels as fk  # noqa: E402
from fused_mlp import act, act_grad, mlp_tensors, timed10  # noqa: E402


@triton.jit
def desync_kernel(a_ptr, b_ptr, h_ptr, out_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, delay_ns, GRAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  WAVE: tl.constexpr):
    """fused_kernels.mlp_act_mm_kernel (persistent), but program p first sleeps delay_ns if it is odd (WAVE=0)
    or in the second wave of one program per SM (WAVE=n_sm)."""
    pid = tl.program_id(0)
    late = (pid % 2 == 1) if WAVE == 0 else (pid >= WAVE)
    if late:
        tl.inline_asm_elementwise("nanosleep.u32 $1; mov.u32 $0, $1;", "=r,r", [tl.full([1], delay_ns, tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    n_m, n_n = M // BLOCK_M, N // BLOCK_N
    for t in tl.range(pid, n_m * n_n, tl.num_programs(0), flatten=True):
        pid_m, pid_n = fk.grouped_tile(t, n_m, n_n, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            ta = tl.load(a_ptr + rm[:, None] * s_am + (k + rk[None, :]) * s_ak)
            tb = tl.load(b_ptr + (k + rk[:, None]) * s_bk + rn[None, :] * s_bn)
            acc = tl.dot(ta, tb, acc)
        fk.mlp_act_epilogue(acc, h_ptr, out_ptr, rm, rn, N, GRAD)


def launch(a, b, h, out, grad, blocks, per_sm, delay_ns):
    (M, K), N = a.shape, b.size(1)
    n_sm = torch.cuda.get_device_properties(a.device).multi_processor_count
    programs = min((M // blocks["BLOCK_M"]) * (N // blocks["BLOCK_N"]), per_sm * n_sm)
    desync_kernel[(programs,)](a, b, h, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), delay_ns,
                               GRAD=grad, WAVE=0 if per_sm == 1 else n_sm, **blocks)


CONFIGS = [  # (per SM, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    (1, 128, 256, 64, 8, 4), (1, 128, 256, 64, 8, 3), (1, 128, 128, 64, 4, 4), (1, 128, 128, 64, 8, 4),
    (2, 128, 128, 64, 4, 3), (2, 128, 128, 64, 4, 2), (2, 128, 128, 64, 8, 3), (2, 128, 128, 32, 4, 4),
    (2, 128, 256, 64, 8, 2), (2, 64, 256, 64, 4, 3), (3, 128, 128, 32, 4, 3), (2, 128, 128, 64, 8, 2)]
DELAYS = [0, 2000, 4000, 6000, 10000]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=196608)
    args = ap.parse_args()
    x, w_up, w_down, g, h = mlp_tensors(args.tokens)
    print(f"device:{torch.cuda.get_device_name(0)} torch:{torch.__version__} triton:{triton.__version__} "
          f"M={args.tokens}")
    mm_up, mm_dg = timed10(lambda: x @ w_up.t()), timed10(lambda: g @ w_down)
    print(f"cuBLAS alone: up {mm_up:.3f} ms, hidden-grad {mm_dg:.3f} ms")
    up_b, dg_b = fk.mlp_kernel_blocks(x.device, False), fk.mlp_kernel_blocks(x.device, True)
    hh, a, dh = torch.empty_like(h), torch.empty_like(h), torch.empty_like(h)
    t_up = timed10(lambda: fk.launch_mlp_kernel(x, w_up.t(), hh, a, False, up_b))
    t_dg = timed10(lambda: fk.launch_mlp_kernel(g, w_down, h, dh, True, dg_b))
    print(f"fused_kernels now: up+act {t_up:.3f} ms ({up_b}), hidden-grad {t_dg:.3f} ms ({dg_b})")
    ref_a, ref_dh = act(h.float()), act_grad((g @ w_down).float(), h.float())
    err = lambda u, r: ((u.float() - r).norm() / r.norm()).item()
    print("| per SM | BLOCK_M | BLOCK_N | BLOCK_K | warps | stages | delay ns | up+act ms | hidden-grad ms | err a | err dh |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for per_sm, bm, bn, bk, w, s in CONFIGS:
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
        for delay in DELAYS:
            hh.zero_(), a.zero_(), dh.zero_()
            try:
                u = timed10(lambda: launch(x, w_up.t(), hh, a, False, blocks, per_sm, delay))
                d = timed10(lambda: launch(g, w_down, h, dh, True, blocks, per_sm, delay))
            except Exception as e:  # e.g. out of shared memory
                print(f"| {per_sm} | {bm} | {bn} | {bk} | {w} | {s} | {delay} | failed: {type(e).__name__} |", flush=True)
                break
            print(f"| {per_sm} | {bm} | {bn} | {bk} | {w} | {s} | {delay} | {u:.3f} | {d:.3f} | "
                  f"{err(a, ref_a):.1e} | {err(dh, ref_dh):.1e} |", flush=True)


if __name__ == "__main__":
    main()
