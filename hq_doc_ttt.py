"""Per-document, score-first LoRA test-time training (PRs #77, #1530): the val stream split into documents
at BOS; each document gets fresh low-rank adapters on the blocks' projections and is walked in chunks of CHUNK
targets: a chunk is scored with the adapters trained on the document's earlier chunks, then one Adam step is
taken on that chunk's loss, then the next chunk. Nothing crosses documents. train_gpt.eval_ttt dispatches here
when TTT_LORA_RANK > 0; counted code (train_gpt.CODE_FILES).

Legality (rules §1.4): C1/C3 -- a target's prediction depends only on its document's earlier tokens (the window
holds them alone) and on adapters fitted to that document's earlier, already scored chunks (the step on chunk i
follows chunk i's score); C2 -- a softmax over the vocabulary; C4 -- the documents' targets tile the stream,
checked here and again by reduce_score.

Documents. Document k holds tokens [s_k, s_{k+1}) (s_0 = 0 even if the stream does not start with BOS, then
every BOS at 1..n-1) and scores targets s_k .. s_{k+1}-1: target j is token j+1, so a document's last target
is the next document's BOS, predicted from this document's tokens alone.

The adapters. `A [B, r, in]` (the same random start for every document) and `B [B, out, r]` (zero, so every
document starts at the base model) per projection and batch row, applied as out + (x A^T) B^T * scale. O, MLP
up and down are forward hooks on their QATLinears (the model's fused kernels are switched off meanwhile, since
those read the weights directly); Q, K and V have no module call of their own (Attention multiplies x by the
three weights concatenated), so a pre-hook on Attention records x and fused_kernels.attn_inputs -- the seam
Attention calls with the q/k/v matmul's output -- is wrapped to add their deltas; the output head (the tied
embedding) is an instance attribute shadowing model.logits that adds (h A^T) B^T to the softcapped logits.
Everything is undone on exit; the base weights are never adapted. A row's loss is the mean over its chunk's
targets, summed over rows, and Adam is elementwise: no row's gradient or step touches another row's adapters.
Batches group documents of similar length (longest first), so which rows share a batch, and how far it is
padded, depends on the other documents' lengths: that moves scores by float noise only (<= 1e-6 on CPU,
tests/test_doc_ttt.py), never by content. A change that keeps every document's length keeps every earlier score
bit for bit.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

import fused_kernels as fast

if TYPE_CHECKING:  # annotations only: train_gpt imports this module
    from hq_dist import Dist
    from train_gpt import GPT, Config, ValData

BOS_ID = 1
SITES = ("q", "k", "v", "o", "up", "down", "head")  # per block: attention q/k/v/o, MLP up/down; once: the output head
DEFAULT_SITES = ("q", "v", "head")  # PR #77's choice (with Adam betas 0.9/0.95); all seven blew up at lr 1e-2 on CPU
PAD_ID = 0  # right padding: causal, so it never reaches an earlier position; its positions neither score nor train


def cfg_kwargs(cfg: Config) -> dict:
    """eval_doc_lora_ttt's settings from their Config fields (TTT_LORA_*, TTT_DOC_*)."""
    return {"rank": cfg.ttt_lora_rank, "chunk": cfg.ttt_doc_chunk, "lr": cfg.ttt_lora_lr,
            "docs_per_batch": cfg.ttt_doc_batch, "targets": tuple(cfg.ttt_lora_sites.split(","))}


# ---- documents and their windows (numpy, no model) ------------------------------------------------------------


def doc_starts(tokens: np.ndarray, n: int, bos: int = BOS_ID) -> np.ndarray:
    """First stream position of every document: 0, then each BOS at 1..n-1 (a BOS at n, the stream's last
    token, is only a target). Document k scores targets starts[k] .. starts[k+1]-1 (the last: n-1)."""
    return np.concatenate(([0], np.flatnonzero(np.asarray(tokens[1:n]) == bos) + 1)).astype(np.int64)


def chunk_plan(m: int, chunk: int, context: int) -> np.ndarray:
    """Windows of a document of m targets, one per chunk, rows (window start, chunk start, chunk end) in document
    coordinates: the window's inputs are the document's tokens [ws, ce) (at most `context`), it scores targets
    [cs, ce) (at most `chunk`)."""
    cs = np.arange(0, m, chunk, dtype=np.int64)
    ce = np.minimum(cs + chunk, m)
    return np.stack((np.maximum(ce - context, 0), cs, ce), 1)


def plain_plan(m: int, context: int) -> np.ndarray:
    """Windows that score a document without adaptation: the first `context` targets in one window, then
    `context // 2` at a time, each with `context` tokens of input (at least context/2 of history)."""
    step = max(context // 2, 1)
    cs = np.concatenate(([0], np.arange(min(m, context), m, step, dtype=np.int64)))
    ce = np.append(cs[1:], m)
    return np.stack((np.maximum(ce - context, 0), cs, ce), 1)


def plan_cost(plan: np.ndarray) -> int:
    return int((plan[:, 2] - plan[:, 0]).sum())  # tokens forwarded


def split_docs(costs: np.ndarray, world: int) -> np.ndarray:
    """Rank r takes documents bounds[r]..bounds[r+1]-1: contiguous, about equal in cost."""
    cum = np.concatenate(([0], np.cumsum(costs, dtype=np.float64)))
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, world) / world, side="left")
    return np.concatenate(([0], np.clip(cuts, 0, len(costs)), [len(costs)])).astype(np.int64)


def window_rows(tokens: np.ndarray, n: int, p: np.ndarray, T: np.ndarray, so: np.ndarray, se: np.ndarray, device):
    """A right-padded batch of windows: inputs tokens[p_i : p_i+T_i], labels one later; `scored` marks the
    targets p_i+so_i .. p_i+se_i-1, `target` the stream index of every position."""
    Tm = int(T.max())
    pos = np.arange(Tm)
    target = p[:, None] + pos
    real = pos < T[:, None]
    x = np.where(real, tokens[np.minimum(target, n - 1)], PAD_ID).astype(np.int64)
    y = np.where(real, tokens[np.minimum(target, n - 1) + 1], PAD_ID).astype(np.int64)
    scored = (pos >= so[:, None]) & (pos < se[:, None])
    return (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), torch.from_numpy(scored).to(device),
            target)


# ---- the adapters ----------------------------------------------------------------------------------------------


class DocLora:
    """Per-batch-row adapters for the sites (layer, kind) of `model`, their Adam state, and the hooks."""

    def __init__(self, model: GPT, rank: int, kinds: tuple, scale: float = 1.0, betas=(0.9, 0.95),
                 eps: float = 1e-8, seed: int = 0):
        bad = [k for k in kinds if k not in SITES]
        if bad or not kinds:
            raise ValueError(f"LoRA targets {bad or kinds} not among {SITES}")
        self.model, self.rank, self.kinds, self.scale, self.betas, self.eps = model, rank, tuple(kinds), scale, betas, eps
        self.modules = {}  # site (layer, kind) -> its QATLinear; the head's: (-1, "head") -> tok_emb (tied)
        for i, blk in enumerate(model.blocks):
            mods = {"q": blk.attn.c_q, "k": blk.attn.c_k, "v": blk.attn.c_v, "o": blk.attn.proj,
                    "up": blk.mlp.up, "down": blk.mlp.down}
            for kind in self.kinds:
                if kind != "head":
                    self.modules[(i, kind)] = mods[kind]
        if "head" in self.kinds:
            self.modules[(-1, "head")] = model.tok_emb
        g = torch.Generator().manual_seed(seed)
        dev = model.tok_emb.weight.device
        # A's start, shared by every document (so no document's start depends on which batch it lands in)
        self.a0 = {s: ((torch.rand(rank, m.weight.size(1), generator=g) * 2 - 1) / math.sqrt(m.weight.size(1))).to(dev)
                   for s, m in self.modules.items()}
        self.active, self.hits, self.params, self.state, self.steps = False, set(), {}, {}, 0
        self._x = None  # (layer, x) of the Attention running now, for the q/k/v deltas

    # -- state
    def reset(self, rows: int) -> None:
        """Fresh adapters for `rows` documents: A = the shared start, B = 0, Adam state 0."""
        self.params = {}
        for s, m in self.modules.items():
            a = self.a0[s].expand(rows, -1, -1).clone().requires_grad_(True)
            b = torch.zeros(rows, m.weight.size(0), self.rank, device=a.device, requires_grad=True)
            self.params[s] = (a, b)
        flat = self.flat()
        self.state = {"m": [torch.zeros_like(p) for p in flat], "v": [torch.zeros_like(p) for p in flat]}
        self.steps = 0

    def keep(self, rows: int) -> None:
        """Keep the first `rows` documents' adapters and state (the others are finished)."""
        if rows == next(iter(self.params.values()))[0].size(0):
            return
        self.params = {s: tuple(t.detach()[:rows].clone().requires_grad_(True) for t in ab) for s, ab in self.params.items()}
        self.state = {k: [t[:rows].clone() for t in v] for k, v in self.state.items()}

    def flat(self) -> list:
        return [t for ab in self.params.values() for t in ab]

    @torch.no_grad()
    def adam_step(self, lr: float) -> None:
        """Adam (no weight decay), elementwise: each row moves by its own gradient alone."""
        ps = self.flat()
        gs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
        b1, b2 = self.betas
        self.steps += 1
        m, v = self.state["m"], self.state["v"]
        torch._foreach_lerp_(m, gs, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, gs, gs, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - b2 ** self.steps))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(ps, m, denom, value=-lr / (1 - b1 ** self.steps))
        for p in ps:
            p.grad = None

    # -- the forward's additions
    def delta(self, site, x: torch.Tensor) -> torch.Tensor:
        a, b = self.params[site]
        self.hits.add(site)
        h = torch.bmm(x, a.to(x.dtype).transpose(1, 2))
        out = torch.bmm(h, b.to(x.dtype).transpose(1, 2))
        return out * self.scale if self.scale != 1.0 else out

    @contextlib.contextmanager
    def attached(self):
        """Hooks in, fused kernels off, fused_kernels.attn_inputs wrapped, model.logits shadowed (head); all undone
        on exit."""
        model, hooks = self.model, []
        own_logits = model.__dict__.get("logits")  # an instance attribute already there (none normally)
        real_logits = model.logits
        fused = [(m, m.fused) for blk in model.blocks for m in (blk.attn, blk.mlp)]
        real_attn_inputs = fast.attn_inputs
        qkv_kinds = [k for k in ("q", "k", "v") if k in self.kinds]

        def out_hook(site):
            def hook(mod, args, out):
                if self.active:
                    return out + self.delta(site, args[0]).to(out.dtype)
            return hook

        def attn_pre(i):
            def hook(mod, args):
                self._x = (i, args[0])
            return hook

        def attn_post(mod, args, out):
            self._x = None

        def attn_inputs(qkv, *args, **kw):
            if self.active and self._x is not None:
                i, x = self._x
                blk = model.blocks[i].attn
                widths = (blk.c_q.weight.size(0), blk.c_k.weight.size(0), blk.c_v.weight.size(0))
                parts = list(qkv.split(widths, -1))
                for j, kind in enumerate(("q", "k", "v")):
                    if kind in qkv_kinds:
                        parts[j] = parts[j] + self.delta((i, kind), x).to(qkv.dtype)
                qkv = torch.cat(parts, -1)
            return real_attn_inputs(qkv, *args, **kw)

        def logits(h):  # the head's delta joins the softcapped logits: still one softmax over the vocabulary
            out = real_logits(h)
            return out + self.delta((-1, "head"), h).float() if self.active else out

        try:
            if "head" in self.kinds:
                model.logits = logits
            for (i, kind), mod in self.modules.items():
                if kind in ("o", "up", "down"):
                    hooks.append(mod.register_forward_hook(out_hook((i, kind))))
            if qkv_kinds:
                for i, blk in enumerate(model.blocks):
                    hooks.append(blk.attn.register_forward_pre_hook(attn_pre(i)))
                    hooks.append(blk.attn.register_forward_hook(attn_post))
                fast.attn_inputs = attn_inputs
            for m, _ in fused:
                m.fused = False
            yield self
        finally:
            if own_logits is None:
                model.__dict__.pop("logits", None)
            else:
                model.logits = own_logits
            fast.attn_inputs = real_attn_inputs
            for h in hooks:
                h.remove()
            for m, f in fused:
                m.fused = f
            self.active, self._x, self.params, self.state = False, None, {}, {}


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Eval mode and no gradients for the base weights; both restored on exit."""
    flags, was_training = [(p, p.requires_grad) for p in model.parameters()], model.training
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


# ---- one chunk of a batch of documents -------------------------------------------------------------------------


def chunk_step(nll_fn: Callable, lora: DocLora, x, y, scored, n_train: int, lr: float) -> torch.Tensor:
    """Score a chunk of every row, then one Adam step on the first n_train rows' chunk losses (each row's mean).
    The scores are the forward's values, taken before the step: one forward serves both (C3: the step comes
    after the score and changes only later chunks' adapters)."""
    with torch.set_grad_enabled(n_train > 0):
        nll = nll_fn(x, y)
    score = nll.detach()
    if n_train > 0:
        w = scored[:n_train].float()
        (nll[:n_train] * (w / w.sum(1, keepdim=True).clamp_min(1))).sum().backward()
        lora.adam_step(lr)
    return score


def adapt_batch(nll_fn, lora: DocLora, tokens, n: int, starts: np.ndarray, lens: np.ndarray, chunk: int,
                context: int, lr: float, device, write: Callable) -> None:
    """Documents (sorted by length, longest first) walked chunk by chunk in lockstep, each row its own adapters.
    Rows whose document has no chunk left are dropped; those with none after this one score without a step.
    The documents' tokens go to the device once; each chunk's windows are gathered there, and the scores come
    back at the end, so the host never waits for the device inside the batch."""
    B, L = len(lens), int(lens.max())
    nchunks = -(-lens // chunk)
    idx = np.minimum(starts[:, None] + np.arange(L + 1), n)
    docs = np.where(np.arange(L + 1) <= lens[:, None], tokens[idx], PAD_ID).astype(np.int64)  # tokens 0..m of each
    docs_t, lens_t = torch.from_numpy(docs).to(device), torch.from_numpy(lens.astype(np.int64)).to(device)
    lora.reset(B)
    pending = []
    for c in range(int(nchunks.max())):
        k = int((nchunks > c).sum())  # a prefix: lengths descend
        lora.keep(k)
        cs = np.full(k, c * chunk)
        ce = np.minimum(cs + chunk, lens[:k])
        ws = np.maximum(ce - context, 0)
        T = int((ce - ws).max())
        pos = np.arange(T)
        # the same windows as chunk_plan's: row i reads the document's tokens [ws_i, ce_i), scores [cs_i, ce_i)
        ce_t = (lens_t[:k] - c * chunk).clamp(max=chunk) + c * chunk  # the same, on the device (no copy per step)
        ws_t = (ce_t - context).clamp(min=0)
        pos_t = torch.arange(T, device=device)
        gidx = (ws_t[:, None] + pos_t).clamp(max=L - 1)
        real = pos_t < (ce_t - ws_t)[:, None]
        x = torch.where(real, docs_t[:k].gather(1, gidx), PAD_ID)
        y = torch.where(real, docs_t[:k].gather(1, gidx + 1), PAD_ID)
        scored = (pos_t >= (c * chunk - ws_t)[:, None]) & real
        lora.active = True
        score = chunk_step(nll_fn, lora, x, y, scored, int((nchunks > c + 1).sum()), lr)
        lora.active = False
        m = (pos >= (cs - ws)[:, None]) & (pos < (ce - ws)[:, None])
        pending.append(((starts[:k] + ws)[:, None] + pos, m, score))
    for target, m, score in pending:
        write(target[m], score.double().cpu().numpy()[m])


def score_plain(nll_fn, tokens, n: int, items: np.ndarray, max_tokens: int, device, write: Callable) -> None:
    """Windows (stream start, length, scored offset from, to), batched by length up to max_tokens tokens,
    scored by the base model."""
    if not len(items):
        return
    items = items[np.argsort(-items[:, 1], kind="stable")]
    i = 0
    while i < len(items):
        rows = max(1, max_tokens // int(items[i, 1]))
        b = items[i:i + rows]
        x, y, scored, target = window_rows(tokens, n, b[:, 0], b[:, 1], b[:, 2], b[:, 3], device)
        with torch.inference_mode():
            nll = nll_fn(x, y)
        m = scored.cpu().numpy()
        write(target[m], nll.double().cpu().numpy()[m])
        i += rows


def plain_items(starts: np.ndarray, lens: np.ndarray, context: int) -> np.ndarray:
    rows = [np.stack((s + p[:, 0], p[:, 2] - p[:, 0], p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), 1)
            for s, m in zip(starts, lens) for p in (plain_plan(int(m), context),)]
    return np.concatenate(rows) if rows else np.zeros((0, 4), np.int64)


# ---- the evaluation --------------------------------------------------------------------------------------------


def eval_doc_lora_ttt(model: GPT, val: ValData, cfg: Config, d: Dist, log: Callable[[str], None], deadline: float,
                      save_nll: str | None = None, *, rank: int = 8, chunk: int = 48, lr: float = 0.001,
                      docs_per_batch: int = 64, context: int = 0, targets: tuple = DEFAULT_SITES, scale: float = 1.0,
                      betas: tuple = (0.9, 0.95), seed: int = 0, name: str = "ttt", compile: bool = False) -> dict:
    """Score every val target once with per-document LoRA TTT (module docstring); returns reduce_score's dict.

    Order: documents of one chunk (nothing to adapt on) are scored by the base model first; then the others,
    longest first, in batches of `docs_per_batch` (sorted by length so a batch's rows finish together; rows are
    independent, so the order changes no score). Before each batch: if its adaptation plus scoring every
    remaining document plainly would pass `deadline`, the remaining documents are scored by the base model
    (plain_plan's windows) and the log says how many targets that was. Documents go to ranks in contiguous
    blocks of about equal cost; no collective until reduce_score."""
    tg = sys.modules[type(model).__module__]  # train_gpt, as run: __main__ under `python train_gpt.py` or packed
    if not hasattr(tg, "reduce_score"):
        import train_gpt as tg
    t0 = time.perf_counter()
    context = context or cfg.eval_seq_len
    if not (rank > 0 and 0 < chunk <= context and docs_per_batch > 0 and lr >= 0):
        raise ValueError(f"need rank > 0, 0 < chunk <= context, docs_per_batch > 0, lr >= 0 "
                         f"(got {rank}, {chunk}, {context}, {docs_per_batch}, {lr})")
    tokens, n, dev = val.tokens, val.n, d.device
    starts_all = doc_starts(tokens, n)
    lens_all = np.diff(np.append(starts_all, n))
    multi_all = lens_all > chunk
    costs = np.array([3 * plan_cost(chunk_plan(int(m), chunk, context)) if mu else int(m)
                      for m, mu in zip(lens_all, multi_all)], dtype=np.float64)
    bounds = split_docs(costs, d.world)
    k_lo, k_hi = int(bounds[d.rank]), int(bounds[d.rank + 1])
    t_lo, t_hi = (int(starts_all[k]) if k < len(starts_all) else n for k in (k_lo, k_hi))
    starts, lens, multi = starts_all[k_lo:k_hi], lens_all[k_lo:k_hi], multi_all[k_lo:k_hi]
    out, seen = np.full(t_hi - t_lo, np.nan), np.zeros(t_hi - t_lo, np.int64)
    tally = {"nll": 0.0, "bytes": 0.0, "done": 0}
    pname = f"{name}_lora"
    prog = tg.Progress(pname, len(out), val, None, log)

    def write(tgt: np.ndarray, nll: np.ndarray) -> None:
        np.add.at(seen, tgt - t_lo, 1)
        out[tgt - t_lo] = nll
        tally["nll"] += float(nll.sum())
        tally["bytes"] += float(val.bytes[tgt].sum())  # documents finish out of stream order: their own bytes
        tally["done"] += len(tgt)
        if prog.due(tally["done"]):
            prog.line(tally["done"], tally["done"], tally["nll"], tally["bytes"])

    def nll_eager(x, y):
        with tg.autocast(d):
            return tg.nll_per_token(model, x, y)
    nll_fn = torch.compile(nll_eager, dynamic=True) if compile and dev.type == "cuda" else nll_eager

    order = np.flatnonzero(multi)
    order = order[np.argsort(-lens[order], kind="stable")]
    batches = [order[i:i + docs_per_batch] for i in range(0, len(order), docs_per_batch)]
    log(f"{pname}: docs:{len(starts)}/{len(starts_all)} (rank {d.rank}) targets:{len(out)} adapted_docs:{len(order)} "
        f"batches:{len(batches)} rank:{rank} chunk:{chunk} lr:{lr} context:{context} sites:{','.join(targets)} "
        f"docs_per_batch:{docs_per_batch}")
    max_tokens = docs_per_batch * context
    lora = DocLora(model, rank, tuple(targets), scale, betas, seed=seed)
    cost_a = [sum(plan_cost(chunk_plan(int(m), chunk, context)) for m in lens[b]) for b in batches]
    cost_p = [sum(plan_cost(plain_plan(int(m), context)) for m in lens[b]) for b in batches]
    rest_p = np.append(np.cumsum(cost_p[::-1])[::-1], 0)  # rest_p[i]: scoring batches i.. plainly
    t_plain = t_adapt = 0.0
    u_plain = u_adapt = 0
    n_single = int(lens[~multi].sum())
    stopped_at, fallback = None, np.zeros(0, np.int64)
    with frozen(model):
        ts = time.perf_counter()
        score_plain(nll_fn, tokens, n, plain_items(starts[~multi], lens[~multi], context), max_tokens, dev, write)
        tg.sync(d)
        t_plain, u_plain = time.perf_counter() - ts, int(lens[~multi].sum())
        with lora.attached():
            for bi, b in enumerate(batches):
                now = time.perf_counter()
                r_a = t_adapt / u_adapt if u_adapt else None  # seconds per token forwarded (and trained)
                r_p = t_plain / u_plain if u_plain > 1000 else (r_a / 3 if r_a else None)
                need = None if r_a is None else 1.1 * (cost_a[bi] * r_a + rest_p[bi + 1] * r_p)
                over = now >= deadline or (need is not None and now + need > deadline)
                if over:
                    stopped_at, fallback = bi, np.concatenate(batches[bi:])
                    break
                adapt_batch(nll_fn, lora, tokens, n, starts[b], lens[b], chunk, context, lr, dev, write)
                if bi == 0 and lora.hits != set(lora.modules):
                    raise RuntimeError(f"{pname}: LoRA sites never reached: {sorted(set(lora.modules) - lora.hits)} "
                                       "(did Attention/MLP stop calling the hooked modules or fast.attn_inputs?)")
                tg.sync(d)
                t_adapt += time.perf_counter() - now
                u_adapt += cost_a[bi]
        if len(fallback):
            n_fb = int(lens[fallback].sum())
            log(f"{pname}: eval budget reached at batch {stopped_at + 1}/{len(batches)} (rank {d.rank}): "
                f"{len(fallback)} documents, {n_fb} targets scored without adaptation")
            ts = time.perf_counter()
            score_plain(nll_fn, tokens, n, plain_items(starts[fallback], lens[fallback], context), max_tokens, dev, write)
            t_plain += time.perf_counter() - ts
    if (seen != 1).any():
        bad = np.flatnonzero(seen != 1)[:5] + t_lo
        raise RuntimeError(f"{pname}: targets {bad.tolist()} scored {seen[bad - t_lo].tolist()} times")
    log(f"{pname}: adapt_time:{t_adapt:.1f}s plain_time:{t_plain:.1f}s single_chunk_targets:{n_single} "
        f"unadapted_after_budget:{int(lens[fallback].sum()) if len(fallback) else 0}")
    return tg.reduce_score([(t_lo, out)] if len(out) else [], val, d, name, t0, log, save_nll)
