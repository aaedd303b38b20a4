"""The optimizer (spec §2.3-2.4): Parallel Muon for the matrices + AdamW for the embedding and scalars, stepped in
the spec's order. Counted code (train_gpt.CODE_FILES)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from hq_dist import Dist

if TYPE_CHECKING:  # annotations only: train_gpt imports this module
    from train_gpt import GPT, Config


def zeropower_ns5(G: torch.Tensor, steps: int) -> torch.Tensor:
    """Newton-Schulz orthogonalization of a batch [k, rows, cols] of same-shape matrices, in bf16."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    for _ in range(steps):  # X <- aX + (bA + cA^2)X with A = XX^T; baddbmm keeps it to three launches
        A = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.mT if tall else X


def param_groups(model: GPT) -> tuple[list, list, list]:
    """Spec §2.3 rule: tok_emb -> Adam embed; every other >=2-D tensor -> Muon; the rest -> Adam scalar."""
    embed, matrices, scalars = [], [], []
    for name, p in model.named_parameters():
        (embed if "tok_emb" in name else matrices if p.ndim >= 2 else scalars).append((name, p))
    return embed, matrices, scalars


class ParallelMuon:
    """Each rank owns a balanced share of the matrices. Gradients are reduce-scattered so each owner gets
    the average of its own matrices only; owners run momentum + Newton-Schulz (batched by shape); the bf16
    updates are all-gathered. Communication equals one all-reduce; the orthogonalization work is split.
    A rank's segment of the flat buffers holds its matrices grouped by shape, so momentum is one flat op and
    each shape group is a zero-copy [k, rows, cols] view (the whole optimizer step: ~380 launches, was ~1,300)."""

    def __init__(self, named: list, d: Dist, ns_steps: int):
        self.d, self.ns_steps = d, ns_steps
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        load = [0] * d.world
        owner = [0] * len(self.params)
        for i in sorted(range(len(self.params)), key=lambda i: -self.params[i].numel()):
            r = min(range(d.world), key=lambda r: load[r])
            owner[i], load[r] = r, load[r] + self.params[i].numel()
        self.seg = max(load)  # every rank's segment of the flat buffers is padded to this length
        self.offset = [0] * len(self.params)
        self.groups = []  # this rank's (start, end, [k, rows, cols]) runs of same-shape matrices
        for r in range(d.world):
            o = r * self.seg
            by_shape: dict = {}
            for i in range(len(self.params)):
                if owner[i] == r:
                    by_shape.setdefault(tuple(self.params[i].shape), []).append(i)
            for shape, idx in by_shape.items():
                start = o
                for i in idx:
                    self.offset[i], o = o, o + self.params[i].numel()
                if r == d.rank:
                    self.groups.append((start - r * self.seg, o - r * self.seg, (len(idx), *shape)))
        self.momentum = torch.zeros(self.seg, device=self.params[0].device)

    def reduce_grads(self) -> torch.Tensor:
        """Average the matrix gradients over ranks; returns this rank's segment (flat, fp32)."""
        flat = torch.zeros(self.d.world * self.seg, device=self.params[0].device)
        have = [(self.view(flat, i), p.grad) for i, p in enumerate(self.params) if p.grad is not None]
        if have:
            torch._foreach_copy_(*map(list, zip(*have)))
        if self.d.world == 1:
            return flat
        mine = torch.empty(self.seg, device=flat.device)
        dist.reduce_scatter_tensor(mine, flat)
        return mine.div_(self.d.world)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        return flat[self.offset[i]:self.offset[i] + self.params[i].numel()].view_as(self.params[i])

    @torch.no_grad()
    def step(self, grads: torch.Tensor, lr: float, momentum: float, wd: float) -> None:
        self.momentum.mul_(momentum).add_(grads)
        u = grads.add(self.momentum, alpha=momentum)  # Nesterov
        update = torch.zeros(self.seg, dtype=torch.bfloat16, device=grads.device)
        for start, end, shape in self.groups:
            rows, cols = shape[1:]
            out = zeropower_ns5(u[start:end].view(shape), self.ns_steps) * max(1.0, rows / cols) ** 0.5
            update[start:end] = out.reshape(-1)
        if self.d.world > 1:
            full = torch.empty(self.d.world * self.seg, dtype=torch.bfloat16, device=grads.device)
            dist.all_gather_into_tensor(full, update)
        else:
            full = update
        full = full.float()
        torch._foreach_mul_(self.params, 1 - lr * wd)  # decoupled weight decay with the scheduled lr
        torch._foreach_add_(self.params, [self.view(full, i) for i in range(len(self.params))], alpha=-lr)

    def state_dict(self) -> dict:
        """Momentum of every matrix by name (gathered from the owners), independent of the world size."""
        flat = torch.zeros(self.d.world * self.seg, device=self.params[0].device)
        flat[self.d.rank * self.seg:(self.d.rank + 1) * self.seg] = self.momentum
        self.d.all_reduce(flat)
        return {n: self.view(flat, i).cpu().clone() for i, n in enumerate(self.names)}

    def load_state_dict(self, sd: dict) -> None:
        for i, n in enumerate(self.names):
            o = self.offset[i] - self.d.rank * self.seg
            if 0 <= o < self.seg:  # owned by this rank
                self.momentum[o:o + self.params[i].numel()].copy_(sd[n].reshape(-1))


class Optimizers:
    """Muon + AdamW with the spec's step order: reduce grads -> clip (global norm) -> Adam -> Muon."""

    def __init__(self, model: GPT, cfg: Config, d: Dist):
        self.cfg, self.d = cfg, d
        embed, matrices, scalars = param_groups(model)
        self.adam_params = [p for _, p in embed + scalars]
        self.adam_names = [n for n, _ in embed + scalars]
        self.adam = torch.optim.AdamW(
            [dict(params=[p for _, p in embed], lr=cfg.tied_embed_lr, base_lr=cfg.tied_embed_lr),
             dict(params=[p for _, p in scalars], lr=cfg.scalar_lr, base_lr=cfg.scalar_lr)],
            betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.adam_wd, fused=d.device.type == "cuda")
        self.muon = ParallelMuon(matrices, d, cfg.muon_backend_steps)

    def muon_momentum(self, step: float) -> float:
        c = self.cfg
        frac = min(1.0, step / c.muon_momentum_warmup_steps) if c.muon_momentum_warmup_steps else 1.0
        return c.muon_momentum_warmup_start + frac * (c.muon_momentum - c.muon_momentum_warmup_start)

    @torch.no_grad()
    def step(self, step: float, scale: float) -> None:
        c, d = self.cfg, self.d
        mgrad = self.muon.reduce_grads()
        agrads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.adam_params]
        aflat = torch.cat([g.reshape(-1) for g in agrads])
        if d.world > 1:
            dist.all_reduce(aflat)
            aflat.div_(d.world)
        # fp64 sums: the clip coefficient must not depend on how the ranks shard the gradient (in fp32 its last
        # bit did, and bf16 Newton-Schulz amplifies one bit into 1e-4 weight differences within 4 steps)
        sq = d.all_reduce(mgrad.double().square().sum()) + aflat.double().square().sum()
        if c.grad_clip_norm > 0:
            coef = (c.grad_clip_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0).float()
            mgrad.mul_(coef)
            aflat.mul_(coef)
        offsets = np.cumsum([0] + [p.numel() for p in self.adam_params])
        have = [(p.grad, aflat[o:o + p.numel()].view_as(p)) for p, o in zip(self.adam_params, offsets) if p.grad is not None]
        if have:  # a parameter without gradient (layer 0's value-residual lambda) stays out of Adam
            torch._foreach_copy_(*map(list, zip(*have)))
        for g in self.adam.param_groups:
            g["lr"] = g["base_lr"] * scale
        self.adam.step()
        self.muon.step(mgrad, c.matrix_lr * scale, self.muon_momentum(step), c.muon_wd)

    def zero_grad(self) -> None:
        # Zeroed in place (one launch) rather than freed: the next backward then accumulates into the same
        # buffers. A parameter that never gets a gradient keeps None and stays out of Adam.
        grads = [p.grad for p in self.adam_params + self.muon.params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)

    def state_dict(self) -> dict:
        return {"adam": self.adam.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.adam.load_state_dict(sd["adam"])
        self.muon.load_state_dict(sd["muon"])
