"""The micro-batches' gradients summed by multi-tensor adds (torch.autograd.grad per micro-batch, then
torch._foreach_add_) instead of .backward() adding each parameter's gradient in a launch of its own (~525 launches
per step), gradients freed instead of zeroed. Patches train_gpt and runs bench_train with the rest of the command line.
    python bench/experiments/grad_foreach.py --data-path .proxy --presets h100 --steps 8 --paths compiled
Measured in session 7 (the same code, then in train_gpt.py): 616.3/616.4 vs 617.0/616.3 ms/step interleaved,
no difference, so not adopted (logs/dev/2026-11-24_h100x1_s7_foreach_*.txt)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import bench_train  # noqa: E402
import train_gpt as tg  # noqa: E402


def forward_backward_foreach(fwd, batches: list, d: tg.Dist) -> torch.Tensor:
    params = [p for p in fwd.parameters() if p.requires_grad]
    total, acc = torch.zeros((), device=d.device), None
    for x, y in batches:
        with tg.autocast(d):
            loss = fwd(x, y)
        grads = torch.autograd.grad(loss / len(batches), params, allow_unused=True)
        if acc is None:
            acc = list(grads)
        else:
            both = [(a, g) for a, g in zip(acc, grads) if a is not None and g is not None]
            if both:
                torch._foreach_add_(*map(list, zip(*both)))
            acc = [g if a is None else a for a, g in zip(acc, grads)]
        total += loss.detach()
    have = [(p, g) for p, g in zip(params, acc) if g is not None]
    add = [(p.grad, g) for p, g in have if p.grad is not None]
    if add:
        torch._foreach_add_(*map(list, zip(*add)))
    for p, g in have:
        if p.grad is None:
            p.grad = g
    return total / len(batches)


def zero_grad_free(self) -> None:
    for p in self.adam_params + self.muon.params:
        p.grad = None


if __name__ == "__main__":
    tg.forward_backward = forward_backward_foreach
    tg.Optimizers.zero_grad = zero_grad_free
    bench_train.main()
