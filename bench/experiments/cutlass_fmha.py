"""Experiment: CUTLASS's Hopper attention forward (cutlass_fmha.cu) against cuDNN's, at this model's shape, and
cuDNN's backward fed with CUTLASS's O and LSE. Prints a table; run on a Hopper GPU with nvcc and the CUTLASS wheel.

  python bench/experiments/cutlass_fmha.py [--batch 128 48] [--iters 20]
"""
import argparse
import ctypes
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fused_kernels import cutlass_build_command, cutlass_include  # noqa: E402
from ceilings import timed  # noqa: E402  (mean of n calls after one warm-up)

SRC = Path(__file__).with_name("cutlass_fmha.cu")
VARIANTS = {  # name: macros
    "tma 64x128": "-DHQ_KIND=0 -DHQ_BQ=64 -DHQ_BK=128",
    "coop 128x64": "-DHQ_KIND=1 -DHQ_BQ=128 -DHQ_BK=64",
    "pingpong 128x64": "-DHQ_KIND=2 -DHQ_BQ=128 -DHQ_BK=64",
    "coop 128x128": "-DHQ_KIND=1 -DHQ_BQ=128 -DHQ_BK=128",
    "pingpong 128x128": "-DHQ_KIND=2 -DHQ_BQ=128 -DHQ_BK=128",
    "tma 64x128, backward 128x128": "-DHQ_KIND=0 -DHQ_BQ=64 -DHQ_BK=128 -DHQ_BWD_BQ=128 -DHQ_BWD_BK=128",
}


def build(name: str, macros: str, out_dir: Path) -> tuple[str, Path | None, str]:
    inc = cutlass_include()
    out = out_dir / (name.replace(",", "").replace(" ", "_") + ".so")
    if out.exists() and out.stat().st_mtime > SRC.stat().st_mtime:  # built here before (carried along)
        return name, out, ""
    # cutlass_mlp.cu's flags (its source, the last argument, swapped for ours), plus the example's headers
    cmd = cutlass_build_command("nvcc", inc, out)[:-1] + [f"-I{inc / 'examples' / '88_hopper_fmha'}",
                                                           *macros.split(), str(SRC)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return name, (out if r.returncode == 0 else None), r.stderr[-2000:]


def fwd_fn(lib):
    f = lib.hq_fmha_fwd
    f.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4 + [ctypes.c_void_p]

    def run(q, k, v):
        B, T, H, D = q.shape
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        rc = f(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), B, T, H, k.size(2),
               torch.cuda.current_stream().cuda_stream)
        if rc:
            raise RuntimeError(f"hq_fmha_fwd returned {rc}")
        return o, lse
    return run


def bwd_fn(lib):
    f = lib.hq_fmha_bwd
    f.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
    lib.hq_fmha_bwd_workspace.argtypes = [ctypes.c_int] * 3
    lib.hq_fmha_bwd_workspace.restype = ctypes.c_size_t

    def run(do, q, k, v, o, lse):  # all [B,T,H,D] fp16 (k, v expanded), lse [B,H,T]
        B, T, H, D = q.shape
        ws = torch.empty(lib.hq_fmha_bwd_workspace(B, T, H), dtype=torch.uint8, device=q.device)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        rc = f(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), do.data_ptr(), dq.data_ptr(),
               dk.data_ptr(), dv.data_ptr(), ws.data_ptr(), B, T, H, torch.cuda.current_stream().cuda_stream)
        if rc:
            raise RuntimeError(f"hq_fmha_bwd returned {rc}")
        return dq, dk, dv
    return run


def backward_table(libs: dict, B: int, iters: int) -> None:
    """The example's backward (fp16, K/V expanded to 8 heads) against cuDNN's: fp16 on the same MHA problem, and bf16
    GQA as in training (cuDNN then sums the two query heads' dK/dV itself)."""
    dev = torch.device("cuda")
    T, H, KV, D = 2048, 8, 4, 64
    torch.manual_seed(0)
    q = (torch.randn(B, T, H, D, device=dev) * 1.5).half()
    k = torch.randn(B, T, KV, D, device=dev).half()
    v = torch.randn(B, T, KV, D, device=dev).half()
    do = (torch.randn(B, T, H, D, device=dev) * 1e-2).half()
    ke, ve = (t.repeat_interleave(H // KV, dim=2).contiguous() for t in (k, v))
    r = cudnn_fwd(q, ke, ve)
    o, lse = r[0].transpose(1, 2).contiguous(), r[1]
    g_ref = cudnn_bwd(do, q, ke, ve, o, lse, r)
    rows = [("cuDNN, fp16, K/V expanded (MHA)", lambda: cudnn_bwd(do, q, ke, ve, o, lse, r), None)]
    qb, kb, vb, dob = (t.bfloat16() for t in (q, k, v, do))
    rb = cudnn_fwd(qb, kb, vb)
    ob = rb[0].transpose(1, 2)
    rows.append(("cuDNN, bf16, GQA (training's)", lambda: cudnn_bwd(dob, qb, kb, vb, ob, rb[1], rb), None))
    for name, lib in libs.items():
        fn = bwd_fn(lib)
        g = fn(do, q, ke, ve, o, lse.view(B, H, T))
        err = max(((a.float() - b.transpose(1, 2).float()).abs().max() / b.float().abs().max()).item()
                  for a, b in zip(g, g_ref))
        rows.append((f"CUTLASS backward ({name}), fp16 MHA", lambda fn=fn: fn(do, q, ke, ve, o, lse.view(B, H, T)), err))
    flop = 2.5 * 4 * B * H * T * T * D / 2
    print(f"| backward, B={B} | ms | ms again | TFLOP/s (2.5x forward) | max rel. diff vs cuDNN fp16 |")
    print("|---|---|---|---|---|")
    first = [timed(f, n=iters) for _, f, _ in rows]
    again = [timed(f, n=iters) for _, f, _ in reversed(rows)][::-1]
    for (name, _, err), a, b in zip(rows, first, again):
        print(f"| {name} | {a:.3f} | {b:.3f} | {flop / a / 1e9:.0f} | {'—' if err is None else f'{err:.2e}'} |")


def cudnn_fwd(q, k, v):
    """O [B,T,H,D] and LSE from cuDNN through aten (what SDPA runs), with the tensors the backward needs."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, True, False)
    return r


def cudnn_bwd(do, q, k, v, o, lse, r):
    qt, kt, vt, ot, dot = (t.transpose(1, 2) for t in (q, k, v, o, do))
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dot, qt, kt, vt, ot, lse, r[6], r[7], None, r[2], r[3], r[4], r[5], 0.0, True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[128, 48])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--build-dir", default=".build/fmha")
    ap.add_argument("--backward", action="store_true", help="time the backward instead")
    args = ap.parse_args()
    out_dir = Path(args.build_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with ThreadPoolExecutor(len(VARIANTS)) as ex:
        built = list(ex.map(lambda kv: build(kv[0], kv[1], out_dir), VARIANTS.items()))
    print(f"built in {time.time() - t0:.0f}s")
    fns, libs = {}, {}
    for name, path, err in built:
        if path is None:
            print(f"{name}: build failed\n{err}")
        else:
            libs[name] = ctypes.CDLL(str(path))
            fns[name] = fwd_fn(libs[name])
    if args.backward:
        for B in args.batch:
            backward_table({n: libs[n] for n in ("tma 64x128", "tma 64x128, backward 128x128") if n in libs}, B, args.iters)
        return
    dev = torch.device("cuda")
    T, H, KV, D = 2048, 8, 4, 64
    for B in args.batch:
        torch.manual_seed(0)
        q = (torch.randn(B, T, H, D, device=dev) * 1.5).bfloat16()
        k = torch.randn(B, T, KV, D, device=dev).bfloat16()
        v = torch.randn(B, T, KV, D, device=dev).bfloat16()
        do = torch.randn(B, T, H, D, device=dev).bfloat16() * 1e-2
        flop = 4 * B * H * T * T * D / 2
        r = cudnn_fwd(q, k, v)
        o_ref, lse_ref = r[0].transpose(1, 2), r[1]
        print(f"\nB={B}: cuDNN O {tuple(r[0].shape)} strides {r[0].stride()}, LSE {tuple(lse_ref.shape)} "
              f"strides {lse_ref.stride()} {lse_ref.dtype}")
        g_ref = cudnn_bwd(do, q, k, v, o_ref, lse_ref, r)
        # fp32 reference on the first 4 sequences: how far each path's gradients are from exact
        qs, ks, vs = (t[:4].float().transpose(1, 2).requires_grad_() for t in (q, k, v))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out32 = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        g32 = torch.autograd.grad(out32, (qs, ks, vs), do[:4].float().transpose(1, 2))
        o32 = out32.detach().transpose(1, 2)

        def err32(g):  # max over dq, dk, dv of max|g - exact| / max|exact|, first 4 sequences
            return max(((a[:4].float() - b).abs().max() / b.abs().max()).item() for a, b in zip(g, g32))
        print(f"cuDNN alone vs fp32: O {(o_ref[:4].float() - o32).abs().max().item():.2e}, grads {err32(g_ref):.2e}")
        rows = [("cuDNN (SDPA's)", timed(lambda: cudnn_fwd(q, k, v), n=args.iters), 0.0, 0.0, None)]
        for name, fn in fns.items():
            o, lse = fn(q, k, v)
            torch.cuda.synchronize()
            do_err = (o.float() - o_ref.float()).abs().max().item()
            lse_err = (lse.view_as(lse_ref) - lse_ref).abs().max().item()
            try:
                g = cudnn_bwd(do, q, k, v, o, lse.view_as(lse_ref), r)
                g_err = err32(g)
                print(f"{name} vs fp32: O {(o[:4].float() - o32).abs().max().item():.2e}, grads {g_err:.2e}")
            except Exception as e:  # noqa: BLE001 (report and go on)
                g_err = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append((name, timed(lambda: fn(q, k, v), n=args.iters), do_err, lse_err, g_err))
        # again, in reverse order, so that a drifting clock shows
        again = {name: timed(lambda: fn(q, k, v), n=args.iters) for name, fn in reversed(list(fns.items()))}
        again["cuDNN (SDPA's)"] = timed(lambda: cudnn_fwd(q, k, v), n=args.iters)
        print(f"| forward, B={B} | ms | ms again | TFLOP/s | max abs O diff | max LSE diff | grads vs fp32, cuDNN backward (rel) |")
        print("|---|---|---|---|---|---|---|")
        for name, ms, oe, le, ge in rows:
            ge = "—" if ge is None else (f"{ge:.2e}" if isinstance(ge, float) else ge)
            print(f"| {name} | {ms:.3f} | {again[name]:.3f} | {flop / ms / 1e9:.0f} | {oe:.2e} | {le:.2e} | {ge} |")
        t_bwd = timed(lambda: cudnn_bwd(do, q, k, v, o_ref, lse_ref, r), n=args.iters)
        print(f"cuDNN backward alone: {t_bwd:.3f} ms ({2.5 * flop / t_bwd / 1e9:.0f} TFLOP/s at 2.5x the forward)")


if __name__ == "__main__":
    main()
