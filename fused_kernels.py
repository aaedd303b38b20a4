"""The fast path, in one module. train_gpt.py's model is plain PyTorch and asks this module for its ops
(attn_inputs, attention, xsa_proj, mlp): each runs its kernel where one applies and otherwise the plain
reference the model passes as `plain`, with the same arguments. So every "does the kernel apply" decision
lives here, as do the hand-written Triton kernels for the step's memory-bound hot spots (each a
torch.library.triton_op, so torch.compile sees through it, behind an autograd.Function), the CUTLASS MLP
kernels (cutlass_mlp.cu, Hopper, built here with nvcc), FlashAttention-3 and inductor's settings.
Counted as code (train_gpt.CODE_FILES). On CPU, TRITON_INTERPRET=1 runs the Triton kernels through Triton's
interpreter: that is how tests/test_kernels.py checks them. Measurements: docs/design.md, docs/performance.md."""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch

try:
    import triton
    import triton.language as tl
    assert hasattr(torch.library, "triton_op")  # torch >= 2.6
except (ImportError, AssertionError):
    triton = None
TRITON_ON_CPU = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
try:  # FlashAttention-3 (Hopper); PyTorch SDPA otherwise
    from flash_attn_interface import flash_attn_func as fa3_attn
except ImportError:
    fa3_attn = None


def mlp_kernel_blocks(device: torch.device, grad: bool) -> dict:
    """The MLP kernel's blocks for the up-projection (grad=False) or the hidden gradient (grad=True)."""
    # H100: the fastest for each pass at the training shape (docs/performance.md); persistent pays only
    # forward, since the backward's epilogue loads h. Ampere
    # (RTX 3090) has about 99 KB of shared memory per block, so half-depth K tiles there (not measured on Ampere).
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        if grad:
            return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3, PERSISTENT=False)
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, PERSISTENT=True)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4, PERSISTENT=False)


# H100: the fastest block shape measured at the training shape, ahead of cuBLAS plus a separate XSA backward
# kernel (docs/design.md); small enough for sm_86's shared memory too. The projection's output width must be
# a multiple of BLOCK_K (xsa_proj checks).
XSA_PROJ_BLOCKS = dict(BLOCK_M=64, BLOCK_K=64, num_warps=8, num_stages=3)


# ----- The seam: the model's ops, each its kernel where one applies, else plain(*the same arguments) -----
def takes(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on t: a CUDA (or interpreted) bf16 tensor; the ops check shapes."""
    return triton is not None and (t.is_cuda or TRITON_ON_CPU) and t.dtype == torch.bfloat16


def pow2(n: int) -> bool:
    return n & (n - 1) == 0


def attn_inputs(qkv, cos, sin, gain, ve, v0, lam, heads: int, kv_heads: int, *, on: bool, plain: Callable):
    """q, k, v and v again (XSA's use) from the q/k/v matmul's output. FusedAttnInputs for power-of-two head
    dims: it sums the gradients of v's two uses as it reads them, where autograd would spend a pass on it."""
    if on and takes(qkv) and pow2(qkv.size(-1) // (heads + 2 * kv_heads)):
        return FusedAttnInputs.apply(qkv, cos, sin, gain, ve, v0, lam, heads, kv_heads)
    q, k, v = plain(qkv, cos, sin, gain, ve, v0, lam, heads, kv_heads)
    return q, k, v, v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, plain: Callable) -> torch.Tensor:
    """Causal attention, q [B,T,H,D], k/v [B,T,KV,D]: FlashAttention-3 where installed (CUDA, bf16)."""
    if fa3_attn is not None and q.is_cuda and q.dtype == torch.bfloat16:
        out = fa3_attn(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    return plain(q, k, v)


def xsa_proj(y: torch.Tensor, v: torch.Tensor, proj, out_scale=None, *, on: bool, plain: Callable) -> torch.Tensor:
    """proj(xsa(y, v)) -> [B,T,dim] (y [B,T,KV,G,D], v [B,T,KV,D], proj a QATLinear): FusedXSAProj, XSA's
    backward inside the projection's, for power-of-two G and D and whole blocks of the projection's output."""
    B, T, KV, G, D = y.shape
    if on and takes(y) and pow2(G) and pow2(D) and proj.weight.size(0) % XSA_PROJ_BLOCKS["BLOCK_K"] == 0:
        return FusedXSAProj.apply(y, v.to(y.dtype), proj.weight_as(y.dtype, out_scale)).view(B, T, -1)
    return plain(y, v, proj, out_scale)


def mlp_applies(x: torch.Tensor, w_up: torch.Tensor) -> bool:
    """Whether FusedMLP runs on x: bf16 (or under bf16 autocast), in whole blocks of both kernels."""
    if not (triton is not None and (x.is_cuda or TRITON_ON_CPU)):
        return False
    dev = x.device.type
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled(dev) and
                                         torch.get_autocast_dtype(dev) == torch.bfloat16)
    M, (N, K) = x[..., 0].numel(), w_up.shape
    return bf16 and all(M % b["BLOCK_M"] == 0 and N % b["BLOCK_N"] == 0 and K % b["BLOCK_K"] == 0
                        for b in (mlp_kernel_blocks(x.device, False), mlp_kernel_blocks(x.device, True)))


def mlp(x: torch.Tensor, up, down, out_scale=None, *, on: bool, plain: Callable) -> torch.Tensor:
    """down(leaky_relu(up(x), 0.5)^2, out_scale) (up, down QATLinears): FusedMLP, the activation in the
    matmuls' epilogues (CUTLASS's kernels once select_mlp_kernels enabled them, else Triton's)."""
    if on and mlp_applies(x, up.weight):
        bf = torch.bfloat16
        w_up, w_down = up.weight_as(bf), down.weight_as(bf, out_scale)
        return FusedMLP.apply(x.reshape(-1, x.size(-1)).to(bf), w_up, w_down).view(*x.shape[:-1], -1)
    return plain(x, up, down, out_scale)


def select_mlp_kernels(fused: bool, cutlass: bool, device: torch.device, log: Callable[[str], None]) -> None:
    """CUTLASS's MLP kernels where they build (on Hopper, before the training clock), else Triton's. Not for
    --eval-only: a first build would eat into the evaluation's budget (docs/performance.md), and the results
    are the same."""
    if fused and cutlass and triton is not None:
        log(f"cutlass_mlp:{enable_cutlass_mlp(device)}")


def tune_inductor(device: torch.device) -> str:
    """Inductor's mix-order reductions (a row's RMS-norm backward fused with column sums: resid_mix gradients, x0's
    deferred gradient adds) load up to 12 activation tensors per row and, unpipelined (torch 2.11's default), run
    well below the memory bandwidth; two pipeline stages (split 32 rows x 4 per iteration) fix that with bit-equal
    stores, column sums equal to fp32 rounding (docs/design.md). The stages need ~100 KiB of shared
    memory: not on consumer GPUs. Returns what it did, for the log."""
    smem = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0) if device.type == "cuda" else 0
    if smem < 200 << 10:
        return "default"
    import torch._inductor.config as inductor
    if not hasattr(inductor.triton, "mix_order_reduction_split_size"):  # torch before mix-order reductions
        return "default (no mix-order reductions in this torch)"
    inductor.triton.mix_order_reduction_allow_multi_stages = True
    inductor.triton.mix_order_reduction_split_size = 32  # 32 rows / XBLOCK 4 = 8 iterations -> 2 stages
    return "mix_order_reduction pipelined (split 32, 2 stages)"


# ----- Triton kernels -----

if triton is not None:
    @triton.jit
    def grouped_tile(t, n_m, n_n, GROUP_M: tl.constexpr):
        """Tile t's (row, column) block: GROUP_M row-blocks in a row share B's column-blocks while in L2."""
        group = t // (GROUP_M * n_n)
        rows = min(n_m - group * GROUP_M, GROUP_M)
        return group * GROUP_M + (t % (GROUP_M * n_n)) % rows, (t % (GROUP_M * n_n)) // rows

    @triton.jit
    def mlp_act_epilogue(acc, h_ptr, out_ptr, rm, rn, N, GRAD: tl.constexpr):
        """acc = the matmul's fp32 tile, rounded to bf16 as a matmul would store it; then
        GRAD=0: h = acc and out = leaky_relu(h, 0.5)^2; GRAD=1: out = acc * d/dh leaky_relu(h, 0.5)^2 (h read)."""
        c = acc.to(tl.bfloat16).to(tl.float32)
        off = rm[:, None] * N + rn[None, :]
        if GRAD:
            h = tl.load(h_ptr + off).to(tl.float32)
            tl.store(out_ptr + off, (c * h * tl.where(h > 0, 2.0, 0.5)).to(tl.bfloat16))
        else:
            act = tl.where(c > 0, c, 0.5 * c)
            tl.store(h_ptr + off, c.to(tl.bfloat16))
            tl.store(out_ptr + off, (act * act).to(tl.bfloat16))

    @triton.jit
    def mlp_act_mm_kernel(a_ptr, b_ptr, h_ptr, out_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, GRAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          PERSISTENT: tl.constexpr, INTERPRET: tl.constexpr):
        """BLOCK_M x BLOCK_N tiles of A @ B (fp32 accumulation) through mlp_act_epilogue. M, N, K must be
        multiples of the blocks (the caller checks); h and out are row-major M x N. One tile per program, or
        PERSISTENT: one program per SM walking the tiles, the loop flattened so that a tile's epilogue
        overlaps the next tile's loads."""
        n_m, n_n = M // BLOCK_M, N // BLOCK_N
        for t in tl.range(tl.program_id(0), n_m * n_n, tl.num_programs(0), flatten=PERSISTENT):
            pid_m, pid_n = grouped_tile(t, n_m, n_n, GROUP_M)
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            rk = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                ta = tl.load(a_ptr + rm[:, None] * s_am + (k + rk[None, :]) * s_ak)
                tb = tl.load(b_ptr + (k + rk[:, None]) * s_bk + rn[None, :] * s_bn)
                if INTERPRET:  # Triton's CPU interpreter multiplies bf16 bit patterns as integers; fp32 is exact
                    ta, tb = ta.to(tl.float32), tb.to(tl.float32)
                acc = tl.dot(ta, tb, acc)
            mlp_act_epilogue(acc, h_ptr, out_ptr, rm, rn, N, GRAD)

    def launch_mlp_kernel(a, b, h, out, grad: bool, blocks: dict):
        (M, K), N = a.shape, b.size(1)
        tiles = (M // blocks["BLOCK_M"]) * (N // blocks["BLOCK_N"])
        if blocks["PERSISTENT"]:
            tiles = min(tiles, torch.cuda.get_device_properties(a.device).multi_processor_count)
        torch.library.wrap_triton(mlp_act_mm_kernel)[(tiles,)](
            a, b, h, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), GRAD=grad,
            INTERPRET=a.device.type == "cpu", **blocks)

    @torch.library.triton_op("hqgpt::mlp_up_act", mutates_args=())
    def mlp_up_act(x: torch.Tensor, w_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h = x @ w_up.T and a = leaky_relu(h, 0.5)^2 in one pass."""
        h = x.new_empty(x.size(0), w_up.size(0))
        a = torch.empty_like(h)
        launch_mlp_kernel(x, w_up.t(), h, a, False, mlp_kernel_blocks(x.device, False))
        return h, a

    @torch.library.triton_op("hqgpt::mlp_act_grad", mutates_args=())
    def mlp_act_grad(grad_y: torch.Tensor, w_down: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Gradient at h: (grad_y @ w_down) * d/dh leaky_relu(h, 0.5)^2 in one pass."""
        grad_h = torch.empty_like(h)
        launch_mlp_kernel(grad_y, w_down, h, grad_h, True, mlp_kernel_blocks(h.device, True))
        return grad_h


    @triton.jit
    def xsa_kernel(y_ptr, v_ptr, out_ptr, R, G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr):
        """XSA over rows r = (token, KV head): v[r] is [D], y[r] the [G, D] outputs of the heads sharing it;
        out = y - (y.vn) vn with vn = v / max(|v|, eps). fp32 math; I/O in the tensors' dtype."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = r < R
        d = tl.arange(0, D)
        v = tl.load(v_ptr + r[:, None] * D + d[None, :], mask=ok[:, None]).to(tl.float32)
        y_off = r[:, None, None] * (G * D) + tl.arange(0, G)[None, :, None] * D + d[None, None, :]
        y = tl.load(y_ptr + y_off, mask=ok[:, None, None]).to(tl.float32)
        vn = (v / tl.maximum(tl.sqrt(tl.sum(v * v, 1)), 1e-12)[:, None])[:, None, :]  # F.normalize's eps
        tl.store(out_ptr + y_off, (y - tl.sum(y * vn, 2)[:, :, None] * vn).to(out_ptr.dtype.element_ty),
                 mask=ok[:, None, None])

    @triton.jit
    def xsa_grad(go, y, v, BLOCK_R: tl.constexpr, D: tl.constexpr):
        """XSA's backward on fp32 tiles: go and y [BLOCK_R, G, D] (the gradient at XSA's output and its input),
        v [BLOCK_R, D] -> (the gradient at y, the gradient at v through the normalization)."""
        norm = tl.sqrt(tl.sum(v * v, 1))
        inv = 1.0 / tl.maximum(norm, 1e-12)  # F.normalize's eps
        vn = (v * inv[:, None])[:, None, :]
        s, t = tl.sum(y * vn, 2)[:, :, None], tl.sum(go * vn, 2)[:, :, None]
        gvn = -tl.sum(s * go + t * y, 1)
        vn2 = tl.reshape(vn, (BLOCK_R, D))
        proj = tl.where(norm[:, None] > 1e-12, tl.sum(gvn * vn2, 1)[:, None] * vn2, 0.0)  # clamped: none
        return go - t * vn, (gvn - proj) * inv[:, None]

    @triton.jit
    def xsa_proj_grad_kernel(gz_ptr, w_ptr, y_ptr, v_ptr, gy_ptr, gv_ptr, M, N, K, G: tl.constexpr, D: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
        """Gradients at XSA's inputs y [M, KV, G, D] and v [M, KV, D], from gz [M, K], the gradient at
        xsa(y, v) @ w.T: each program takes BLOCK_M rows of one KV head's G*D columns of go = gz @ w (w [K, N])
        and runs XSA's backward on them in its epilogue, so go never goes to memory."""
        j, rm = tl.program_id(0), tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = rm < M
        rn = j * (G * D) + tl.arange(0, G * D)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, G * D), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            ta = tl.load(gz_ptr + rm[:, None] * K + (k + rk[None, :]), mask=ok[:, None], other=0.0)
            tb = tl.load(w_ptr + (k + rk[:, None]) * N + rn[None, :])
            if INTERPRET:  # Triton's CPU interpreter multiplies bf16 bit patterns as integers; fp32 is exact
                ta, tb = ta.to(tl.float32), tb.to(tl.float32)
            acc = tl.dot(ta, tb, acc)
        go = tl.reshape(acc.to(gz_ptr.dtype.element_ty).to(tl.float32), (BLOCK_M, G, D))  # as a matmul stores it
        d = tl.arange(0, D)
        y_off = rm[:, None, None] * N + j * (G * D) + tl.arange(0, G)[None, :, None] * D + d[None, None, :]
        v_off = rm[:, None] * (N // G) + j * D + d[None, :]
        y = tl.load(y_ptr + y_off, mask=ok[:, None, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + v_off, mask=ok[:, None], other=0.0).to(tl.float32)
        gy, gv = xsa_grad(go, y, v, BLOCK_M, D)
        tl.store(gy_ptr + y_off, gy.to(gy_ptr.dtype.element_ty), mask=ok[:, None, None])
        tl.store(gv_ptr + v_off, gv.to(gv_ptr.dtype.element_ty), mask=ok[:, None])

    def launch_xsa_proj_grad(gz, w, y, v, gy, gv, blocks: dict):
        (M, K), N = gz.shape, w.size(1)
        G, D = y.shape[-2:]
        torch.library.wrap_triton(xsa_proj_grad_kernel)[(N // (G * D), triton.cdiv(M, blocks["BLOCK_M"]))](
            gz, w, y, v, gy, gv, M, N, K, G=G, D=D, INTERPRET=gz.device.type == "cpu", **blocks)

    @torch.library.triton_op("hqgpt::xsa_fwd", mutates_args=())
    def xsa_fwd(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        G, D = y.shape[-2:]
        out, R = torch.empty_like(y), v.numel() // D
        torch.library.wrap_triton(xsa_kernel)[(triton.cdiv(R, 64),)](y, v, out, R, G=G, D=D, BLOCK_R=64, num_warps=4)
        return out

    @torch.library.triton_op("hqgpt::xsa_proj_grad", mutates_args=())
    def xsa_proj_grad(gz: torch.Tensor, w: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gy, gv = torch.empty_like(y), torch.empty_like(v)
        launch_xsa_proj_grad(gz, w, y, v, gy, gv, XSA_PROJ_BLOCKS)
        return gy, gv

    @triton.jit
    def qk_inputs_kernel(qkv_ptr, cos_ptr, sin_ptr, gain_ptr, gq_ptr, gk_ptr, q_ptr, k_ptr, gpart_ptr, R, T,
                           C: tl.constexpr, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                           GRAD: tl.constexpr, BLOCK_R: tl.constexpr):
        """Rows r = (token, head) over the H query and KV key heads in qkv [N, C]: RMS-normalize, rotate the first
        2*HALF dims (RoPE at the token's position), scale query heads by their gain; into q [N,H,D], k [N,KV,D].
        GRAD=1: from gq/gk (the gradients at q, k) to the gradient at qkv's q/k columns (written to q_ptr, laid
        out like qkv) and, per query row, its share of the gain's gradient (gpart [N,H], fp32)."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        tok, hh = r // (H + KV), r % (H + KV)
        ok, is_q = r < R, hh < H
        d = tl.arange(0, D)[None, :]
        rot = d < 2 * HALF
        part = tl.where(d < HALF, d + HALF, tl.where(rot, d - HALF, d))  # each rotated dim's partner
        t = (tok % T)[:, None] * HALF + d % HALF
        c = tl.where(rot, tl.load(cos_ptr + t, mask=ok[:, None] & rot, other=1.0).to(tl.float32), 1.0)
        s = tl.load(sin_ptr + t, mask=ok[:, None] & rot, other=0.0).to(tl.float32)
        s = tl.where(d < HALF, s, -s)  # out[d] = xn[d] c[d] + xn[partner] s[d]
        row = tok[:, None] * C + hh[:, None] * D
        x = tl.load(qkv_ptr + row + d, mask=ok[:, None]).to(tl.float32)
        xp = tl.load(qkv_ptr + row + part, mask=ok[:, None]).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + 1e-6)[:, None]  # F.rms_norm's eps
        gain = tl.load(gain_ptr + hh, mask=ok & is_q, other=1.0).to(tl.float32)[:, None]
        mq, mk = (ok & is_q)[:, None], (ok & ~is_q)[:, None]
        q_off = tok[:, None] * (H * D) + hh[:, None] * D
        k_off = tok[:, None] * (KV * D) + (hh[:, None] - H) * D
        if GRAD:
            go = tl.load(gq_ptr + q_off + d, mask=mq, other=0.0) + tl.load(gk_ptr + k_off + d, mask=mk, other=0.0)
            gop = tl.load(gq_ptr + q_off + part, mask=mq, other=0.0) + tl.load(gk_ptr + k_off + part, mask=mk, other=0.0)
            go, gop = go.to(tl.float32), gop.to(tl.float32)
            xn = x * rstd
            tl.store(gpart_ptr + tok * H + hh, tl.sum(go * (xn * c + xp * rstd * s), 1), mask=ok & is_q)
            gxn = gain * (go * c - gop * s)
            gx = rstd * (gxn - xn * tl.sum(gxn * xn, 1)[:, None] / D)
            tl.store(q_ptr + row + d, gx.to(q_ptr.dtype.element_ty), mask=ok[:, None])
        else:
            out = gain * rstd * (x * c + xp * s)
            tl.store(q_ptr + q_off + d, out.to(q_ptr.dtype.element_ty), mask=mq)
            tl.store(k_ptr + k_off + d, out.to(k_ptr.dtype.element_ty), mask=mk)

    @triton.jit
    def values_kernel(qkv_ptr, ve_ptr, v0_ptr, lam_ptr, gv_ptr, gv2_ptr, v_ptr, g0_ptr, part_ptr, n, col, stride,
                      W: tl.constexpr, HAS_VE: tl.constexpr, MIX: tl.constexpr, GRAD: tl.constexpr, GV2: tl.constexpr,
                      BLOCK: tl.constexpr):
        """The values v_raw = qkv[:, col:col+W] (+ ve [N, W] if HAS_VE). GRAD=0: v [N, W] = v_raw, or with MIX (the
        value residual) lam0 * v0 + lam1 * v_raw. GRAD=1, from gv (the gradient at v; plus gv2 if GV2, the gradient
        at v's second use, summed here instead of in a pass of its own): into qkv's gradient (v_ptr,
        laid out like qkv) gv, or with MIX lam1 * gv, and then g0 = lam0 * gv (the gradient at v0) and, per
        program, the partial sums of gv * v0 and gv * v_raw (part [programs, 2], fp32): the gradient at lam."""
        e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = e < n
        src = (e // W) * stride + col + e % W
        if GRAD:
            g = tl.load(gv_ptr + e, mask=ok, other=0.0).to(tl.float32)
            if GV2:
                g += tl.load(gv2_ptr + e, mask=ok, other=0.0).to(tl.float32)
        if MIX or not GRAD:
            x = tl.load(qkv_ptr + src, mask=ok, other=0.0).to(tl.float32)
            if HAS_VE:  # rounded as the bf16 sum the plain path makes
                x = (x + tl.load(ve_ptr + e, mask=ok, other=0.0).to(tl.float32)).to(qkv_ptr.dtype.element_ty).to(tl.float32)
        if MIX:
            lam0, lam1 = tl.load(lam_ptr).to(tl.float32), tl.load(lam_ptr + 1).to(tl.float32)
            v0 = tl.load(v0_ptr + e, mask=ok, other=0.0).to(tl.float32)
            if GRAD:
                tl.store(g0_ptr + e, (lam0 * g).to(g0_ptr.dtype.element_ty), mask=ok)
                tl.store(part_ptr + 2 * tl.program_id(0), tl.sum(g * v0, 0))
                tl.store(part_ptr + 2 * tl.program_id(0) + 1, tl.sum(g * x, 0))
                g = lam1 * g
            else:
                x = lam0 * v0 + lam1 * x
        if GRAD:
            tl.store(v_ptr + src, g.to(v_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(v_ptr + e, x.to(v_ptr.dtype.element_ty), mask=ok)

    def launch_qk_inputs(qkv, cos, sin, gain, gq, gk, q, k, gpart, heads: int, kv: int, grad: bool):
        B, T, C = qkv.shape
        D = C // (heads + 2 * kv)
        R, block = B * T * (heads + kv), 32
        torch.library.wrap_triton(qk_inputs_kernel)[(triton.cdiv(R, block),)](
            qkv, cos, sin, gain, gq, gk, q, k, gpart, R, T, C=C, H=heads, KV=kv, D=D, HALF=cos.size(-1),
            GRAD=grad, BLOCK_R=block, num_warps=4)

    VALUES_BLOCK = 1024

    def launch_values(qkv, ve, v0, lam, gv, gv2, v, g0, part, w: int, grad: bool):
        n, C = qkv.size(0) * qkv.size(1) * w, qkv.size(-1)
        torch.library.wrap_triton(values_kernel)[(triton.cdiv(n, VALUES_BLOCK),)](
            qkv, qkv if ve is None else ve, qkv if v0 is None else v0, qkv if lam is None else lam, gv,
            gv if gv2 is None else gv2, v, g0, part, n, C - w, C, W=w, HAS_VE=ve is not None, MIX=v0 is not None,
            GRAD=grad, GV2=gv2 is not None, BLOCK=VALUES_BLOCK)

    @torch.library.triton_op("hqgpt::attn_inputs", mutates_args=())
    def attn_inputs_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor,
                       ve: Optional[torch.Tensor], v0: Optional[torch.Tensor], lam: Optional[torch.Tensor],
                       heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (normalized, rotated, q scaled by gain) and v (+ ve; mixed with v0 by lam) from the fused q/k/v
        matmul's output."""
        B, T, C = qkv.shape
        D = C // (heads + 2 * kv_heads)
        q, k, v = (qkv.new_empty(B, T, n, D) for n in (heads, kv_heads, kv_heads))
        launch_qk_inputs(qkv, cos, sin, gain, q, k, q, k, gain, heads, kv_heads, False)  # gq, gk, gpart: unused
        launch_values(qkv, ve, v0, lam, v, None, v, v, v, kv_heads * D, False)  # gv, g0, part: unused
        return q, k, v

    @torch.library.triton_op("hqgpt::attn_inputs_grad", mutates_args=())
    def attn_inputs_grad(gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, gv2: Optional[torch.Tensor],
                         qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor,
                         ve: Optional[torch.Tensor], v0: Optional[torch.Tensor],
                         lam: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradient at qkv, per-row shares of the gain's gradient and, with v0, the gradient at v0 and per-program
        shares of lam's (empty without v0), given those at q, k, v (and at v's second use, gv2, if given)."""
        B, T, C = qkv.shape
        g = torch.empty_like(qkv)
        gpart = qkv.new_empty(B * T, gq.size(2), dtype=torch.float32)
        launch_qk_inputs(qkv, cos, sin, gain, gq, gk, g, g, gpart, gq.size(2), gk.size(2), True)
        w = gv.size(2) * gv.size(3)
        g0 = torch.empty_like(gv) if v0 is not None else gv.new_empty(0)
        lam_part = gv.new_empty((triton.cdiv(gv.numel(), VALUES_BLOCK), 2) if v0 is not None else (0, 2),
                                dtype=torch.float32)
        launch_values(qkv, ve, v0, lam, gv, gv2, g, g0, lam_part, w, True)
        return g, gpart, g0, lam_part


class FusedAttnInputs(torch.autograd.Function):
    """attn_inputs() in one Triton pass each way (two kernels: q/k rows, values); inductor spread its backward
    over five kernels plus a gather of the three gradients into the matmul's, and the value residual over more.
    v comes out twice, for the attention and for XSA: autograd would sum their gradients in a pass of its own,
    the backward's values kernel sums them as it reads them."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, gain, ve, v0, lam, heads, kv_heads):
        T = qkv.size(1)
        cos, sin = (t[0, :T, 0].to(qkv.dtype).contiguous() for t in (cos, sin))  # as apply_rope rounds them
        qkv, ve, v0 = (None if t is None else t.contiguous() for t in (qkv, ve, v0))
        ctx.save_for_backward(qkv, cos, sin, gain, ve, v0, lam)
        q, k, v = attn_inputs_op(qkv, cos, sin, gain, ve, v0, lam, heads, kv_heads)
        return q, k, v, v.view_as(v)

    @staticmethod
    def backward(ctx, gq, gk, gv, gv2):
        qkv, cos, sin, gain, ve, v0, lam = ctx.saved_tensors
        g, gpart, g0, lam_part = attn_inputs_grad(gq.contiguous(), gk.contiguous(), gv.contiguous(), gv2.contiguous(),
                                                  qkv, cos, sin, gain, ve, v0, lam)
        w = gv.size(2) * gv.size(3)
        g_ve = g[..., -w:].reshape(gv.shape[:2] + (w,)) if ve is not None else None
        g_v0, g_lam = (g0, lam_part.sum(0).to(lam.dtype)) if v0 is not None else (None, None)
        return g, None, None, gpart.sum(0).to(gain.dtype), g_ve, g_v0, g_lam, None, None


class FusedXSAProj(torch.autograd.Function):
    """The output projection of XSA's output, xsa(y, v) @ w.T, on bf16 y [..., KV, G, D], v [..., KV, D], w [K, KV*G*D].
    Forward: one Triton pass for XSA, then cuBLAS. Backward: XSA's backward rides in the epilogue of the matmul
    that gives the gradient at XSA's output (inductor spread XSA's backward over five kernels)."""

    @staticmethod
    def forward(ctx, y, v, w):
        y, v = y.contiguous(), v.contiguous()
        out = xsa_fwd(y, v).view(-1, w.size(1))
        ctx.save_for_backward(y, v, w, out)  # the attention saves y and v anyway; out is the matmul's input
        return out @ w.t()

    @staticmethod
    def backward(ctx, gz):
        y, v, w, out = ctx.saved_tensors
        gz = gz.reshape(-1, w.size(0)).contiguous()
        gy, gv = xsa_proj_grad(gz, w.contiguous(), y, v)
        return gy, gv, gz.t() @ out if ctx.needs_input_grad[2] else None  # TTT's frozen blocks: no weight gradient


# ----- CUTLASS's MLP kernels (Hopper) -----
CUTLASS_SOURCE = Path(__file__).with_name("cutlass_mlp.cu")
CUTLASS_BUILD_DIR = Path.home() / ".cache" / "hqgpt"
cutlass_lib: Optional[ctypes.CDLL] = None  # set by enable_cutlass_mlp; FusedMLP then runs CUTLASS's kernels


def cutlass_include() -> Optional[Path]:
    """CUTLASS 3's source tree (include/, tools/util/include/): $CUTLASS_PATH, else the nvidia-cutlass wheel's."""
    if os.environ.get("CUTLASS_PATH"):
        return Path(os.environ["CUTLASS_PATH"])
    import importlib.util
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "source"
    return root if (root / "include" / "cutlass" / "cutlass.h").exists() else None


def cutlass_build_command(nvcc: str, include: Path, out: Path) -> list[str]:
    return [nvcc, "-std=c++17", "-O3", "-DNDEBUG", "-gencode=arch=compute_90a,code=sm_90a",
            f"-I{include / 'include'}", f"-I{include / 'tools' / 'util' / 'include'}", "--expt-relaxed-constexpr",
            "-Xcompiler", "-fPIC", "-shared", "-cudart", "static", "-o", str(out), str(CUTLASS_SOURCE)]


def build_cutlass_mlp(build_dir: Path) -> Path:
    """Compile cutlass_mlp.cu once per (source, nvcc, CUTLASS) into build_dir; ranks sharing the directory wait on
    one lock and then find the library. Raises RuntimeError saying what is missing."""
    nvcc = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    include = cutlass_include()
    if not Path(nvcc).exists():
        raise RuntimeError("no nvcc (on PATH or in $CUDA_HOME/bin)")
    if include is None:
        raise RuntimeError("no CUTLASS headers (pip install nvidia-cutlass, or set CUTLASS_PATH)")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(CUTLASS_SOURCE.read_bytes() + version.encode() + str(include).encode()).hexdigest()[:16]
    build_dir.mkdir(parents=True, exist_ok=True)
    out = build_dir / f"cutlass_mlp_{key}.so"
    with open(build_dir / f"cutlass_mlp_{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            r = subprocess.run(cutlass_build_command(nvcc, include, tmp), capture_output=True, text=True)
            if r.returncode:
                tmp.unlink(missing_ok=True)
                raise RuntimeError(f"nvcc failed on {CUTLASS_SOURCE.name}:\n{r.stderr[-3000:]}")
            os.replace(tmp, out)
    return out


def enable_cutlass_mlp(device: torch.device, build_dir: Path = CUTLASS_BUILD_DIR) -> str:
    """Use CUTLASS's MLP kernels on a Hopper GPU if they build; returns what happened, for the log."""
    global cutlass_lib
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return "off (not a Hopper GPU)"
    t0 = time.perf_counter()
    try:
        lib = ctypes.CDLL(str(build_cutlass_mlp(build_dir)))
    except (RuntimeError, OSError) as e:
        return f"off ({str(e).splitlines()[0]})"
    args = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
    lib.hq_mlp_up_act.argtypes = lib.hq_mlp_act_grad.argtypes = args
    cutlass_lib = lib
    x = torch.randn(300, 64, device=device).bfloat16()  # a partial row tile too
    w = torch.randn(128, 64, device=device).bfloat16()
    try:
        h, _ = mlp_up_act_cutlass(x, w)
        ok = torch.allclose(h.float(), x.float() @ w.float().t(), rtol=2 ** -7, atol=1e-2)
    except RuntimeError:
        ok = False
    if not ok:
        cutlass_lib = None
        return "off (the built kernel failed its self-check)"
    return f"on ({time.perf_counter() - t0:.1f}s to build or load)"


def cutlass_call(fn, a: torch.Tensor, b: torch.Tensor, aux: torch.Tensor, out: torch.Tensor):
    (M, K), N = a.shape, out.size(1)
    rc = fn(a.data_ptr(), b.data_ptr(), aux.data_ptr(), out.data_ptr(), M, N, K,
            torch.cuda.current_stream(a.device).cuda_stream)
    if rc:
        raise RuntimeError(f"cutlass_mlp.cu: {fn.__name__} returned {rc} for M={M} N={N} K={K}")


def aligned(t: torch.Tensor) -> torch.Tensor:
    """Row-major with a 16-byte aligned start, as CUTLASS's bulk tensor copies need."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


@torch.library.custom_op("hqgpt::mlp_up_act_cutlass", mutates_args=())
def mlp_up_act_cutlass(x: torch.Tensor, w_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mlp_up_act through cutlass_mlp.cu."""
    h = x.new_empty(x.size(0), w_up.size(0))
    a = torch.empty_like(h)
    cutlass_call(cutlass_lib.hq_mlp_up_act, aligned(x), aligned(w_up), h, a)
    return h, a


@mlp_up_act_cutlass.register_fake
def _(x, w_up):
    return x.new_empty(x.size(0), w_up.size(0)), x.new_empty(x.size(0), w_up.size(0))


@torch.library.custom_op("hqgpt::mlp_act_grad_cutlass", mutates_args=())
def mlp_act_grad_cutlass(grad_y: torch.Tensor, w_down: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """mlp_act_grad through cutlass_mlp.cu."""
    grad_h = torch.empty_like(h)
    cutlass_call(cutlass_lib.hq_mlp_act_grad, aligned(grad_y), aligned(w_down), aligned(h), grad_h)
    return grad_h


@mlp_act_grad_cutlass.register_fake
def _(grad_y, w_down, h):
    return torch.empty_like(h)


class FusedMLP(torch.autograd.Function):
    """down(leaky_relu(up(x), 0.5)^2) on 2-D bf16 tensors. Same products as the unfused MLP, but the
    activation rides in the up-projection's epilogue and its derivative in the epilogue of the matmul that
    produces the hidden gradient: two fewer full passes over the 4x-wide hidden activations each way."""

    @staticmethod
    def forward(ctx, x, w_up, w_down):
        h, a = (mlp_up_act if cutlass_lib is None or not x.is_cuda else mlp_up_act_cutlass)(x, w_up)
        ctx.save_for_backward(x, w_up, w_down, h, a)
        return a @ w_down.t()

    @staticmethod
    def backward(ctx, grad_y):
        x, w_up, w_down, h, a = ctx.saved_tensors
        grad_h = (mlp_act_grad if cutlass_lib is None or not h.is_cuda else mlp_act_grad_cutlass)(grad_y, w_down, h)
        need_x, need_up, need_down = ctx.needs_input_grad  # TTT's frozen blocks need no weight gradients
        return (grad_h @ w_up if need_x else None, grad_h.t() @ x if need_up else None,
                grad_y.t() @ a if need_down else None)
