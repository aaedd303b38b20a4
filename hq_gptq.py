"""Error-compensated (GPTQ) export of the QAT linears: integer levels chosen column by column so that each
column's rounding error is absorbed by the columns not yet quantized, weighted by the calibration inputs'
second moments H = sum x x^T. Only the levels change: the per-row scales are the ones quantize_rows gives,
so the artifact's format and loader stay as they are. Plain torch; counted code (train_gpt.CODE_FILES).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch

PENT = 5  # the pentanary alphabet, levels {-2..2}; 2^k is int-k, levels [-2^(k-1), 2^(k-1) - 1]


def level_range(alphabet: int) -> tuple[int, int]:
    return (-2, 2) if alphabet == PENT else (-(alphabet // 2), alphabet // 2 - 1)


def row_step(scale: torch.Tensor, alphabet: int) -> torch.Tensor:
    # a level's value is q * step: train_gpt.dequantize_rows' float ops exactly, so the error compensated here is
    # the one the loader will see
    return scale.float() / (1 if alphabet == PENT else alphabet // 2)


def _inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping)^-1: row j of U, over U[j, j], is how column j's error spreads onto
    the later columns. Damping grows tenfold until H factors (few samples, or fp32 round-off, leave it singular)."""
    eye = torch.eye(H.size(0), device=H.device, dtype=H.dtype)
    mean_diag = H.diagonal().mean().clamp_min(1e-12)
    for k in range(8):
        L, info = torch.linalg.cholesky_ex(H + (damp * 10 ** k) * mean_diag * eye)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0:
                return U
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with heavy damping")


@torch.no_grad()
def gptq_rows(W: torch.Tensor, step: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, H: torch.Tensor,
              damp: float = 0.01, block: int = 128, act_order: bool = True) -> torch.Tensor:
    """Levels q [rows, cols] (float, integer-valued) for W [rows, cols] whose value is q * step (step, lo, hi:
    [rows, 1], fixed per row), minimising sum over rows of (w - q*step) H (w - q*step)^T greedily, column by column
    (GPTQ: lazy updates in blocks of `block` columns; act_order: columns of larger H diagonal first)."""
    W, H = W.float().clone(), H.float().clone()
    n = H.size(0)
    dead = H.diagonal() == 0
    # an input no calibration token reached: its column is rounded plainly and passes no error on (its row and
    # column of H are zero, so a unit diagonal keeps it out of every other column's update)
    H[dead, dead] = 1.0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(n, device=H.device)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_factor(H, damp)
    step = step.float()
    inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))  # a zero scale (an all-zero row): level 0
    lo, hi = lo.float(), hi.float()
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, E1, U1 = W[:, i1:i2], torch.zeros_like(W[:, i1:i2]), U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            w = W1[:, j:j + 1]
            q = torch.minimum(torch.maximum(torch.round(w * inv), lo), hi)
            Q[:, i1 + j:i1 + j + 1] = q
            e = (w - q * step) / U1[j, j]
            W1[:, j:] -= e * U1[j:j + 1, j:]
            E1[:, j:j + 1] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]


def gptq_levels(w: torch.Tensor, alphabet: int, scale: torch.Tensor, H: torch.Tensor, **kw) -> torch.Tensor:
    """Levels of one matrix w [out, in] at its fixed per-row (fp16) scale [out, 1]; H [in, in]."""
    return gptq_shared(H, [(w, alphabet, scale)], **kw)[0]


def gptq_shared(H: torch.Tensor, mats: list, **kw) -> list[torch.Tensor]:
    """Levels of matrices (w, alphabet, scale) that multiply the same input (one H): their rows are independent
    problems with the same H, so they are solved as one stack (q, k and v: one column loop instead of three)."""
    rows = []
    for w, a, s in mats:
        lo, hi = level_range(a)
        step = row_step(s, a).to(w.device)
        rows.append((w.float(), step.expand(w.size(0), 1), torch.full_like(step, lo).expand(w.size(0), 1),
                     torch.full_like(step, hi).expand(w.size(0), 1)))
    Q = gptq_rows(*(torch.cat(c) for c in zip(*rows)), H.to(mats[0][0].device), **kw)
    return list(Q.split([w.size(0) for w, _, _ in mats]))


def gptq_model(hessians: dict, mats: list, **kw) -> dict[str, torch.Tensor]:
    """mats: (name, hessian key, w, alphabet, scale); returns name -> levels, solving those sharing a key together."""
    by_key: dict = {}
    for m in mats:
        by_key.setdefault(m[1], []).append(m)
    out = {}
    for key, group in by_key.items():
        qs = gptq_shared(hessians[key], [m[2:] for m in group], **kw)
        out.update({m[0]: q for m, q in zip(group, qs)})
    return out


@torch.no_grad()
def collect_hessians(model: torch.nn.Module, modules: list, batches: Iterable, forward: Callable,
                     context: Callable = contextlib.nullcontext) -> dict:
    """name -> sum over every calibration token of x x^T (fp32), x the first input of that (name, module) each
    time it runs (a module run twice, as in recurrence, adds both). forward(model, batch) runs the model, inside
    context() (autocast, say)."""
    H: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(_module, args):
            x = args[0].detach().reshape(-1, args[0].size(-1)).float()
            if name not in H:
                H[name] = torch.zeros(x.size(1), x.size(1), device=x.device)
            with torch.autocast(x.device.type, enabled=False):  # the sum in fp32 whatever the forward's autocast
                H[name].addmm_(x.T, x)
        return add
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules]
    try:
        for b in batches:
            with context():
                forward(model, b)
    finally:
        for h in handles:
            h.remove()
    return H


def first_rows(next_batches: Callable, n: int):
    """The first n rows (sequences) of the batches [rows, ...] that successive next_batches() calls return (each
    a list), in batches; calls it no more often than those rows need."""
    while n > 0:
        for b in next_batches():
            yield b[:n]
            n -= b.size(0)
            if n <= 0:
                return


@contextlib.contextmanager
def attr_set(objs: list, name: str, value):
    """Each of objs with attribute `name` set to value for the duration; restored after."""
    old = [getattr(o, name) for o in objs]
    for o in objs:
        setattr(o, name, value)
    try:
        yield
    finally:
        for o, v in zip(objs, old):
            setattr(o, name, v)


def export(model: torch.nn.Module, linears: list, next_batches: Callable, rows: int, forward: Callable,
           scale: Callable, reduce: Callable = lambda t: t, sync: Callable = lambda: None,
           context: Callable = contextlib.nullcontext, **kw) -> tuple[dict, dict]:
    """GPTQ levels of every linear (name, input name, input module, weight, alphabet): the Hessian of each input
    module from the first `rows` sequences of next_batches() (collect_hessians), summed over ranks by reduce(t)
    (in place, the same order on every rank), then each weight solved at its fixed scale(weight, alphabet).
    Returns name -> levels (CPU) and the seconds {"hessian", "solve", "total"} (sync(): wait for the device)."""
    sync()
    t0 = time.perf_counter()
    inputs = sorted({(k, m) for _, k, m, _, _ in linears}, key=lambda km: km[0])
    H = collect_hessians(model, inputs, first_rows(next_batches, rows), forward, context)
    for k, _ in inputs:
        reduce(H[k])
    sync()
    t1 = time.perf_counter()
    mats = [(n, k, w.detach(), a, scale(w.detach(), a).to(w.device)) for n, k, _, w, a in linears]
    levels = {n: q.cpu() for n, q in gptq_model(H, mats, **kw).items()}
    t2 = time.perf_counter()
    return levels, {"hessian": t1 - t0, "solve": t2 - t1, "total": t2 - t0}
