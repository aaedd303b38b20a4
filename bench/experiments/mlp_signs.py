"""What the fused MLP kernel should keep for its backward: h (bf16) beside a, or only h's signs. Epilogue variants
of fused_kernels.mlp_act_mm_kernel, timed at the h100 micro-batch shape (196,608 tokens, 512 -> 2048, bf16):
  h      store h and a; backward reads h                          (what fused_kernels.py does)
  bits   store a and the signs 8 to a byte; backward reads a + bits, |h| = sqrt(a)
  int8   store a and one sign byte per element (no repacking)
  bits-nosqrt   as bits, backward without the sqrt (wrong values: isolates the sqrt's cost)
  *-prefetch    the backward loads its epilogue inputs before the K loop
Each time is the mean of 10 back-to-back launches (median of 20 such).   python bench/experiments/mlp_signs.py"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import fused_kernels as fk  # noqa: E402
from fused_mlp import act, act_grad, mlp_tensors, timed10  # noqa: E402

VARIANTS = {"h": 0, "bits": 1, "int8": 2, "bits-nosqrt": 3}


@triton.jit
def epilogue_inputs(h_ptr, a_ptr, s_ptr, off, b_off, VAR: tl.constexpr):
    """What the backward's epilogue reads: h (VAR 0; returned twice), or a and the signs."""
    if VAR == 0:
        pre = tl.load(h_ptr + off)
        sg = pre
    else:
        pre = tl.load(a_ptr + off)
        if VAR == 2:
            sg = tl.load(s_ptr + off)
        else:
            sg = tl.load(s_ptr + b_off)
    return pre, sg


@triton.jit
def variant_kernel(x_ptr, w_ptr, h_ptr, a_ptr, s_ptr, out_ptr, M, N, K, s_xm, s_xk, s_wk, s_wn, GRAD: tl.constexpr,
                   VAR: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = fk.grouped_tile(tl.program_id(0), M // BLOCK_M, N // BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    off = rm[:, None] * N + rn[None, :]
    b_off = rm[:, None] * (N // 8) + (pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8))[None, :]
    bit = tl.arange(0, 8)[None, None, :]
    if GRAD and PREFETCH:
        pre, sg = epilogue_inputs(h_ptr, a_ptr, s_ptr, off, b_off, VAR)
    x = x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk
    w = w_ptr + rk[:, None] * s_wk + rn[None, :] * s_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(x), tl.load(w), acc)
        x += BLOCK_K * s_xk
        w += BLOCK_K * s_wk
    c = acc.to(tl.bfloat16).to(tl.float32)
    if GRAD:
        if not PREFETCH:
            pre, sg = epilogue_inputs(h_ptr, a_ptr, s_ptr, off, b_off, VAR)
        p = pre.to(tl.float32)
        if VAR == 0:
            g = c * p * tl.where(p > 0, 2.0, 0.5)
        else:
            if VAR == 2:
                neg = sg != 0
            else:
                neg = tl.reshape((sg.to(tl.int32)[:, :, None] >> bit) & 1, (BLOCK_M, BLOCK_N)) != 0
            r = p if VAR == 3 else tl.sqrt(p)
            g = c * r * tl.where(neg, -1.0, 2.0)
        tl.store(out_ptr + off, g.to(tl.bfloat16))
    else:
        av = tl.where(c > 0, c, 0.5 * c)
        tl.store(a_ptr + off, (av * av).to(tl.bfloat16))
        if VAR == 0:
            tl.store(h_ptr + off, c.to(tl.bfloat16))
        elif VAR == 2:
            tl.store(s_ptr + off, (c < 0).to(tl.int8))
        else:
            tl.store(s_ptr + b_off, tl.sum(tl.reshape((c < 0).to(tl.int32), (BLOCK_M, BLOCK_N // 8, 8)) << bit, 2).to(tl.uint8))


def run(x, w, h, a, s, out, grad, var, prefetch, blocks):
    (M, K), N = x.shape, w.size(1)
    variant_kernel[((M // blocks["BLOCK_M"]) * (N // blocks["BLOCK_N"]),)](
        x, w, h, a, s, out, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), GRAD=grad, VAR=var,
        PREFETCH=prefetch, **blocks)


def main():
    M, D, H = 196608, 512, 2048
    x, w_up, w_down, g, h_ref = mlp_tensors(M, D, H)
    dA = g @ w_down
    ref_a, ref_dh = act(h_ref.float()), act_grad(dA.float(), h_ref.float())
    err = lambda u, r: ((u.float() - r).norm() / r.norm()).item()
    print(f"device:{torch.cuda.get_device_name(0)} torch:{torch.__version__} triton:{triton.__version__} M={M}")
    blocks = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)  # fused_kernels' then
    print(f"blocks {blocks}")
    print("| variant | up+act ms | hidden-grad ms | sum | err a | err dh |\n|---|---|---|---|---|---|")
    for name, var in VARIANTS.items():
        for prefetch in (False, True):
            h, a, out = torch.empty_like(h_ref), torch.empty_like(h_ref), torch.empty_like(h_ref)
            s = torch.empty(M, H if var == 2 else H // 8, dtype=torch.int8 if var == 2 else torch.uint8, device="cuda")
            try:
                u = timed10(lambda: run(x, w_up.t(), h, a, s, out, False, var, False, blocks))
                d = timed10(lambda: run(g, w_down, h, a, s, out, True, var, prefetch, blocks))
            except Exception as e:
                print(f"| {name}{'-prefetch' if prefetch else ''} | failed: {type(e).__name__}: {str(e)[:120]} |")
                continue
            print(f"| {name}{'-prefetch' if prefetch else ''} | {u:.3f} | {d:.3f} | {u + d:.3f} | {err(a, ref_a):.1e} "
                  f"| {err(out, ref_dh):.1e} |", flush=True)
    h, _ = fk.mlp_up_act(x, w_up)
    u, d = timed10(lambda: fk.mlp_up_act(x, w_up)), timed10(lambda: fk.mlp_act_grad(g, w_down, h))
    print(f"fused_kernels ops (eager): up+act {u:.3f} ms, hidden-grad {d:.3f} ms")


if __name__ == "__main__":
    main()
