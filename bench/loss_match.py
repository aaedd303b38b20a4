"""Does the fast path compute the same thing? The first N training losses (same seed, same batches, the
real lr warm-up) of three paths of the h100 preset, side by side:
  plain          eager (no torch.compile), fp32 residual stream, no fused MLP kernels, micro-batches of 48
                 (the default 128 would not fit in 80 GB eager; micro-batching changes only the summation order)
  compiled-fp32  torch.compile, fp32 residual stream, no fused MLP kernels: the size of bf16 kernel noise alone
  fast           torch.compile, bf16 residual stream, fused MLP kernels (the default)

    python bench/loss_match.py --data-path .proxy --steps 50
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_gpt as tg  # noqa: E402
from bench_train import setup  # noqa: E402

PATHS = {"plain": dict(compile=0, residual_dtype="fp32", fused_kernels=0, micro_batch_seqs=48),
         "compiled-fp32": dict(compile=1, residual_dtype="fp32", fused_kernels=0),
         "fast": dict(compile=1, residual_dtype="bf16", fused_kernels=1)}


def losses(path: str, steps: int, data_path: str, preset: str) -> list[float]:
    d, cfg, model, fwd, opt, loader = setup(preset, data_path, **PATHS[path])
    out, t0 = [], time.perf_counter()
    for i in range(steps):
        out.append(tg.forward_backward(fwd, loader.next_step(), d))
        opt.step(i, tg.lr_scale(cfg, i, 0.0))
        opt.zero_grad()
    out = [float(v) for v in out]  # one host sync at the end
    print(f"  {path}: {steps} steps in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-path", default=".proxy")
    ap.add_argument("--preset", default="h100")
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"device:{dev} torch:{torch.__version__} preset:{a.preset} steps:{a.steps}")
    runs = {p: losses(p, a.steps, a.data_path, a.preset) for p in PATHS}
    plain = runs["plain"]
    print("| step | " + " | ".join(PATHS) + " | compiled-fp32 - plain | fast - plain |")
    print("|---|" + "---|" * (len(PATHS) + 2))
    for i in range(a.steps):
        r = [runs[p][i] for p in PATHS]
        print(f"| {i + 1} | " + " | ".join(f"{v:.4f}" for v in r) + f" | {r[1] - plain[i]:+.4f} | {r[2] - plain[i]:+.4f} |")
    k = min(10, a.steps)
    for p in ("compiled-fp32", "fast"):
        diff = [abs(u - v) for u, v in zip(runs[p], plain)]
        print(f"{p} vs plain: max |diff| {max(diff):.4f}, mean |diff| {sum(diff) / len(diff):.4f}, "
              f"mean of the last {k} losses {sum(runs[p][-k:]) / k:.4f} vs {sum(plain[-k:]) / k:.4f}")


if __name__ == "__main__":
    main()
