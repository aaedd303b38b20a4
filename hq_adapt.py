"""Test-time adaptation's updates (spec §5.3-5.4): SLOT's hidden-state offset fit and TTT's weight step; their callers
in train_gpt.py (Scorer, eval_ttt) choose what each may learn from. Counted code (train_gpt.CODE_FILES)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hq_dist import Dist
from hq_optim import zeropower_ns5

if TYPE_CHECKING:  # annotations only: train_gpt imports this module
    from train_gpt import GPT, Config


def slot_adam_step(h, delta, m, v, emb, y, w, lr, k, softcap: float, wd: float = 1e-8, eps: float = 1e-5):
    """One AdamW step (betas 0.9/0.999) on the SLOT offset, with the softcapped-CE gradient in closed form:
    a handful of fused kernels instead of an autograd graph per inner step. Rows of `w` weight the positions
    (their sums define each delta's loss); delta has one row per window, or one shared row."""
    t = torch.tanh(F.linear((h + delta).to(emb.dtype), emb).float() / softcap)
    p = torch.softmax(softcap * t, dim=-1)
    g = p.scatter_add(-1, y.unsqueeze(-1), -torch.ones_like(p[..., :1])) * w.unsqueeze(-1) * (1 - t * t)
    grad = (g.to(emb.dtype) @ emb).float().sum(dim=1, keepdim=True)
    if delta.size(0) == 1:
        grad = grad.sum(dim=0, keepdim=True)
    delta = delta * (1 - lr * wd)
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad * grad
    step = lr * (m / (1 - 0.9 ** k)) / ((v / (1 - 0.999 ** k)).sqrt() + eps)
    return delta - step, m, v


def fit_slot_delta(step_fn, model: GPT, h: torch.Tensor, y: torch.Tensor, fit: torch.Tensor, cfg: Config, shared: bool):
    """SLOT: a hidden-state offset delta fitted on the positions in `fit`. Causal mode: one delta per window,
    fitted on its context (targets that earlier windows scored), so no scored label reaches its own
    prediction. Reference mode (spec §5.3): one delta shared by the batch, fitted on the scored positions
    themselves -- the scored labels shape their own predictions (fails C1/C3)."""
    delta = torch.zeros(1 if shared else h.size(0), 1, h.size(-1), device=h.device)
    m, v = torch.zeros_like(delta), torch.zeros_like(delta)
    w = fit.float()
    w = w / w.sum().clamp_min(1) if shared else w / w.sum(1, keepdim=True).clamp_min(1)
    emb = model.tok_emb.weight.detach().to(torch.bfloat16 if h.is_cuda else torch.float32)
    for k in range(cfg.slot_steps):
        lr = cfg.slot_lr_min + 0.5 * (cfg.slot_lr - cfg.slot_lr_min) * (1 + math.cos(math.pi * k / cfg.slot_steps))
        delta, m, v = step_fn(h, delta, m, v, emb, y, w, torch.tensor(lr, device=h.device),
                              torch.tensor(k + 1.0, device=h.device), cfg.logit_softcap)
    return delta


@torch.no_grad()
def ttt_update(params: list, sgd, lr: float, cfg: Config, d: Dist) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = d.all_reduce(torch.cat([g.reshape(-1) for g in grads]))  # each rank's loss is already /total
    if cfg.ttt_grad_clip > 0:
        flat.mul_((cfg.ttt_grad_clip / (flat.norm() + 1e-6)).clamp(max=1.0))
    o = 0
    for p in params:
        g = flat[o:o + p.numel()].view_as(p)
        o += p.numel()
        if sgd is not None:
            p.grad = g.clone()
        else:  # Muon-style TTT (spec V62): orthogonalized step for matrices, raw gradient otherwise
            p.add_(zeropower_ns5(g[None], cfg.muon_backend_steps)[0].to(p.dtype) if p.ndim == 2 else g, alpha=-lr)
            p.grad = None
    if sgd is not None:
        sgd.param_groups[0]["lr"] = lr
        sgd.step()
        sgd.zero_grad(set_to_none=True)
