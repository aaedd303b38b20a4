"""Issue 5 experiment: the MLP's fused matmuls as CUTLASS warp-specialized kernels (cutlass_mlp.cu, one build
per schedule/tile/cluster variant) against train_gpt's Triton kernels and plain cuBLAS, at the training shape:

  python bench/experiments/cutlass_mlp.py --rows 262144 --variants pingpong:128x128:1,coop:128x256:1

A variant is schedule:tile:cluster[:key=value...], e.g. pingpong:128x128:2x1:epi=64x64:raster=2:swizzle=4
(cluster "2" = 2x1; raster 1 along M, 2 along N; unset options keep cutlass_mlp.cu's defaults).

Needs nvcc and CUTLASS's headers (pip install nvidia-cutlass, or CUTLASS_PATH). Prints, per variant and pass,
the median ms of 20 timed calls and the largest difference from the Triton kernel."""
import argparse
import ctypes
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import fused_kernels  # noqa: E402
from mlp_fusion import timed  # noqa: E402



def build(variant: str, out_dir: Path) -> Path:
    """variant: schedule:MxN:cluster_m, e.g. pingpong:128x128:1."""
    sched, tile, cluster, *opts = variant.split(":")
    tm, tn = tile.split("x")
    cm, cn = (cluster + "x1").split("x")[:2]
    out = out_dir / f"cutlass_mlp_{variant.replace(':', '_').replace('=', '')}.so"
    nvcc = fused_kernels.shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cmd = fused_kernels.cutlass_build_command(nvcc, fused_kernels.cutlass_include(), out)
    flags = [f"-DHQ_TILE_M={tm}", f"-DHQ_TILE_N={tn}", f"-DHQ_CLUSTER_M={cm}", f"-DHQ_CLUSTER_N={cn}",
             f"-DHQ_PINGPONG={int(sched == 'pingpong')}"]
    for o in opts:
        key, value = o.split("=")
        if key == "epi":
            em, en = value.split("x")
            flags += [f"-DHQ_EPI_M={em}", f"-DHQ_EPI_N={en}"]
        else:
            flags.append(f"-DHQ_{key.upper()}={value}")
    cmd[1:1] = flags
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{variant}: {r.stderr[-2000:]}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="pingpong:128x128:1,coop:128x256:1")
    ap.add_argument("--build-dir", default=".build")
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048)
    args = ap.parse_args()
    variants = args.variants.split(",")
    Path(args.build_dir).mkdir(exist_ok=True)
    def load(v):
        try:
            return ctypes.CDLL(str(build(v, Path(args.build_dir)).resolve()))
        except RuntimeError as e:  # a variant CUTLASS rejects: report it, time the rest
            print(f"build failed: {str(e)[:300]}")
            return None
    with ThreadPoolExecutor(len(variants)) as ex:
        libs = list(ex.map(load, variants))
    vp, ci = ctypes.c_void_p, ctypes.c_int
    for lib in libs:
        if lib is not None:
            lib.hq_mlp_up_act.argtypes = lib.hq_mlp_act_grad.argtypes = [vp] * 4 + [ci] * 3 + [vp]
    M, K, N = args.rows, args.dim, args.hidden
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w_up = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
    w_down = (torch.randn(K, N, device="cuda", generator=g) * N ** -0.5).bfloat16()
    gy = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    stream = lambda: vp(torch.cuda.current_stream().cuda_stream)  # noqa: E731
    print(f"device:{torch.cuda.get_device_name()} torch:{torch.__version__} M={M} K={K} N={N}")
    h_ref, a_ref = fused_kernels.mlp_up_act(x, w_up)
    gh_ref = fused_kernels.mlp_act_grad(gy, w_down, h_ref)
    flop = 2 * M * N * K
    rows = [("cuBLAS x @ w_up.T (no activation)", timed(lambda: x @ w_up.t()), "", ""),
            ("cuBLAS gy @ w_down (no activation)", timed(lambda: gy @ w_down), "", ""),
            ("Triton forward (train_gpt)", timed(lambda: fused_kernels.mlp_up_act(x, w_up)), "0", ""),
            ("Triton hidden gradient (train_gpt)", timed(lambda: fused_kernels.mlp_act_grad(gy, w_down, h_ref)), "0", "")]
    for name, lib in zip(variants, libs):
        if lib is None:
            rows.append((f"CUTLASS {name}", float("nan"), "build failed", ""))
            continue
        h, a, gh = torch.empty_like(h_ref), torch.empty_like(a_ref), torch.empty_like(gh_ref)
        rc = lib.hq_mlp_up_act(x.data_ptr(), w_up.data_ptr(), h.data_ptr(), a.data_ptr(), M, N, K, stream())
        rc2 = lib.hq_mlp_act_grad(gy.data_ptr(), w_down.data_ptr(), h_ref.data_ptr(), gh.data_ptr(), M, N, K, stream())
        torch.cuda.synchronize()
        if rc or rc2:
            rows.append((f"CUTLASS {name}", float("nan"), f"rc {rc}/{rc2}", ""))
            continue
        diff_f = max((h.float() - h_ref.float()).abs().max().item(), (a.float() - a_ref.float()).abs().max().item())
        same_f = (h == h_ref).float().mean().item()
        diff_b = (gh.float() - gh_ref.float()).abs().max().item()
        same_b = (gh == gh_ref).float().mean().item()
        tf = timed(lambda: lib.hq_mlp_up_act(x.data_ptr(), w_up.data_ptr(), h.data_ptr(), a.data_ptr(), M, N, K, stream()))
        tb = timed(lambda: lib.hq_mlp_act_grad(gy.data_ptr(), w_down.data_ptr(), h_ref.data_ptr(), gh.data_ptr(),
                                               M, N, K, stream()))
        rows.append((f"CUTLASS forward, {name}", tf, f"{diff_f:.3g}", f"{same_f:.4f}"))
        rows.append((f"CUTLASS hidden gradient, {name}", tb, f"{diff_b:.3g}", f"{same_b:.4f}"))
    print("| kernel | ms | TFLOP/s | max abs diff vs Triton | share of h / grad_h bit-equal |")
    print("|---|---|---|---|---|")
    for name, ms, diff, same in rows:
        print(f"| {name} | {ms:.3f} | {flop / ms / 1e9:.0f} | {diff} | {same} |")


if __name__ == "__main__":
    main()
