"""A/B in one process, alternating: optimizer zero_grad freeing the gradients (set_to_none) vs zeroing them
in place (the current Optimizers.zero_grad).    python bench/experiments/zero_grad_ab.py   (proxy shards in .proxy)"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_train import setup, tg, train_step_fn  # noqa: E402

d, cfg, model, fwd, opt, loader = setup("h100", ".proxy")
in_place = tg.Optimizers.zero_grad


def to_none(self):
    for p in self.adam_params + self.muon.params:
        p.grad = None


step = train_step_fn(fwd, opt, loader, d)
for i in range(3):
    step(i)
i = 3
for rep in range(2):
    for name, fn in (("set_to_none", to_none), ("in_place", in_place)):
        tg.Optimizers.zero_grad = fn
        step(i)
        i += 1
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(6):
            step(i)
            i += 1
        torch.cuda.synchronize()
        print(f"zero_grad {name}: {(time.perf_counter() - t0) / 6 * 1000:.1f} ms/step", flush=True)
