"""Issue 5 experiment (session 10, not adopted): cutlass_mlp.cu keeping h's signs (1 bit per element, in the
epilogue's register order) instead of h in bf16, the backward taking the derivative as 2 sqrt(a) or -sqrt(a), against
the version that stores h, both against the Triton kernels; at the training shape, in one process. Needs the
patch that makes the sign-bit version (on 37a2405) and the old source beside it:

  git show 37a2405:cutlass_mlp.cu > runs/old_cutlass_mlp.cu && git apply bench/experiments/cutlass_signs.patch
  python bench/experiments/cutlass_signs.py --old runs/old_cutlass_mlp.cu [--rows 262144]

Each time is the median of 20 calls. Prints, per kernel, ms and how its outputs compare with the Triton kernel's."""
import argparse
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import fused_kernels as fk  # noqa: E402
from mlp_fusion import timed  # noqa: E402


def build_old(src: Path, out: Path) -> ctypes.CDLL:
    nvcc = fk.shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cmd = fk.cutlass_build_command(nvcc, fk.cutlass_include(), out)
    cmd[-1] = str(src)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    lib = ctypes.CDLL(str(out.resolve()))
    lib.hq_mlp_up_act.argtypes = lib.hq_mlp_act_grad.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
    return lib


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="the cutlass_mlp.cu that stores h")
    ap.add_argument("--build-dir", default=".build")
    ap.add_argument("--rows", type=int, default=262144)
    args = ap.parse_args()
    Path(args.build_dir).mkdir(exist_ok=True)
    print("new:", fk.enable_cutlass_mlp(torch.device("cuda"), Path(args.build_dir)), flush=True)
    old = build_old(Path(args.old), Path(args.build_dir) / "cutlass_mlp_old.so")
    M, K, N = args.rows, 512, 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    x, gy = (torch.randn(M, K, device="cuda", generator=g).bfloat16() for _ in range(2))
    w_up = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
    w_down = (torch.randn(K, N, device="cuda", generator=g) * N ** -0.5).bfloat16()
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    print(f"device:{torch.cuda.get_device_name()} torch:{torch.__version__} M={M} K={K} N={N}")
    h_ref, a_ref = fk.mlp_up_act(x, w_up)
    gh_ref = fk.mlp_act_grad(gy, w_down, h_ref)
    signs, a = fk.mlp_up_act_cutlass(x, w_up)
    gh = fk.mlp_act_grad_cutlass(gy, w_down, a, signs)
    h_old, a_old, gh_old = torch.empty_like(h_ref), torch.empty_like(a_ref), torch.empty_like(gh_ref)
    old_fwd = lambda: old.hq_mlp_up_act(x.data_ptr(), w_up.data_ptr(), h_old.data_ptr(), a_old.data_ptr(),  # noqa: E731
                                        M, N, K, stream())
    old_bwd = lambda: old.hq_mlp_act_grad(gy.data_ptr(), w_down.data_ptr(), h_ref.data_ptr(), gh_old.data_ptr(),  # noqa: E731
                                          M, N, K, stream())
    lib = fk.cutlass_lib  # the new kernels called as the old are (ctypes, buffers made once): the custom ops'
    new_fwd = lambda: lib.hq_mlp_up_act(x.data_ptr(), w_up.data_ptr(), signs.data_ptr(), a.data_ptr(),  # noqa: E731
                                        M, N, K, stream())  # dispatch would land inside the timed span
    new_bwd = lambda: lib.hq_mlp_act_grad(gy.data_ptr(), w_down.data_ptr(), a.data_ptr(), signs.data_ptr(),  # noqa: E731
                                          gh.data_ptr(), M, N, K, stream())
    old_fwd(), old_bwd()
    torch.cuda.synchronize()
    rows = [("cuBLAS x @ w_up.T (no activation)", timed(lambda: x @ w_up.t()), ""),
            ("cuBLAS gy @ w_down (no activation)", timed(lambda: gy @ w_down), ""),
            ("Triton forward", timed(lambda: fk.mlp_up_act(x, w_up)), "reference"),
            ("Triton hidden gradient", timed(lambda: fk.mlp_act_grad(gy, w_down, h_ref)), "reference"),
            ("CUTLASS forward, stores h (old)", timed(old_fwd), f"h, a equal: {torch.equal(h_old, h_ref)}, "
             f"{torch.equal(a_old, a_ref)}"),
            ("CUTLASS hidden gradient, reads h (old)", timed(old_bwd),
             f"equal: {torch.equal(gh_old, gh_ref)}"),
            ("CUTLASS forward, stores h's signs (new)", timed(new_fwd),
             f"a equal: {torch.equal(a, a_ref)}; sign bytes {signs.numel():,} vs h {h_ref.numel() * 2:,}"),
            ("CUTLASS hidden gradient, reads a + signs (new)", timed(new_bwd),
             f"equal: {torch.equal(gh, gh_ref)} (2 sqrt(a), -sqrt(a)): share equal to Triton's "
             f"{(gh == gh_ref).float().mean().item():.4f}, max rel diff "
             f"{((gh.float() - gh_ref.float()).abs() / gh_ref.float().abs().clamp(min=1e-3)).max().item():.3g}")]
    print("| kernel | ms | TFLOP/s | outputs vs Triton |")
    print("|---|---|---|---|")
    for name, ms, note in rows:
        print(f"| {name} | {ms:.3f} | {2 * M * N * K / ms / 1e9:.0f} | {note} |")


if __name__ == "__main__":
    main()
