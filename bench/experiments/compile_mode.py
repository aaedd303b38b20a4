"""Experiment: the h100 step compiled with torch.compile mode MODE (default | reduce-overhead = CUDA graphs |
max-autotune-no-cudagraphs = Triton matmul templates with fused epilogues, benchmarked against cuBLAS |
coordinate-descent = default mode with inductor's coordinate-descent tuning of its own kernels' block sizes),
gradients kept allocated and zeroed in place (CUDA-graph outputs must not become .grad).
    python bench/experiments/compile_mode.py [MODE]   (proxy shards in .proxy)"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_train import setup, tg  # noqa: E402

mode = sys.argv[1] if len(sys.argv) > 1 else "reduce-overhead"
if mode == "coordinate-descent":
    import torch._inductor.config as inductor_config
    inductor_config.coordinate_descent_tuning = True
d, cfg, model, fwd, opt, loader = setup("h100", ".proxy", compile_mode=None if mode in ("default", "coordinate-descent") else mode)
for p in model.parameters():
    p.grad = torch.zeros_like(p)


def step(i):
    tot = torch.zeros((), device="cuda")
    for x, y in loader.next_step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with tg.autocast(d):
            loss = fwd(x, y)
        (loss / loader.accum).backward()
        tot += loss.detach()
    opt.step(i, 1.0)
    torch._foreach_zero_([p.grad for p in model.parameters()])
    return tot


t0 = time.perf_counter()
for i in range(3):
    step(i)
torch.cuda.synchronize()
warm = time.perf_counter() - t0
t0, n = time.perf_counter(), 8
for i in range(n):
    tot = step(3 + i)
torch.cuda.synchronize()
dt = (time.perf_counter() - t0) / n
print(f"mode:{mode} warm:{warm:.1f}s ms/step:{dt * 1000:.1f} tok/s:{cfg.train_batch_tokens / dt / 1e6:.3f}M "
      f"peak:{torch.cuda.max_memory_allocated() / 2**30:.2f}GiB loss:{(tot / loader.accum).item():.4f}")
