"""hq_doc_ttt.py: per-document, score-first LoRA TTT. C4 (every target once, stream order), the reference forward
at lr 0, legality by perturbation (C1/C3: a token moves no earlier target's score) and a planted train-before-score
leak that the same check catches, C2 at a chunk's and a document's first target, documents' independence, the
model left as it was, the eval budget, ranks, and bench/doc_ttt_probe.py.

Target j is token j+1, predicted from tokens <= j; so changing token t may move targets >= t-1 only."""
import contextlib
import copy
import io
import math
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, TOKENIZER, dist1, randomize, smoke_cfg, tg, val_tokens, write_shard

import hq_doc_ttt as dt  # noqa: E402  (conftest put the repository on sys.path)
import fused_kernels as fast  # noqa: E402

CTX, CHUNK = 64, 16
# document lengths in tokens; the stream does not start with BOS (document 0 has none), one document is a lone
# BOS, several are a chunk or less, several are longer than the context (they slide), and the stream ends in BOS
LENS = [7, 40, 1, 16, 17, 90, 33, 150, 5, 64, 65, 120, 48, 200, 30]


def make_stream(lens=LENS, offset=100, end_bos=True) -> np.ndarray:
    src = val_tokens(offset + sum(lens) + 1).astype(np.int64)
    src[src == dt.BOS_ID] = 5
    out, o = [], offset
    for i, m in enumerate(lens):
        seg = list(src[o:o + (m if i == 0 else m - 1)])
        o += len(seg)
        out += seg if i == 0 else [dt.BOS_ID] + seg
    return np.array(out + ([dt.BOS_ID] if end_bos else []), dtype=np.uint16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    run = tmp_path_factory.mktemp("doc_ttt")
    cfg = smoke_cfg(run, eval_seq_len=CTX, eval_stride=CTX)
    model = randomize(tg.GPT(cfg), seed=3, std=0.05)
    tokens = make_stream()
    cache = {}

    def run_eval(toks, lr=0.05, batch=4, deadline_s=600.0, log=None, model_=None, **kw):
        key = (toks.tobytes(), lr, batch, deadline_s, tuple(sorted(kw.items())))
        if key not in cache or log is not None or model_ is not None:
            val = tg.ValData(cfg, tokens=np.asarray(toks, dtype=np.uint16))
            path = str(run / f"{len(cache)}.npy")
            r = dt.eval_doc_lora_ttt(model_ or model, val, cfg, dist1(), log or (lambda m: None),
                                     time.perf_counter() + deadline_s, path, rank=4, chunk=kw.pop("chunk", CHUNK),
                                     lr=lr, docs_per_batch=batch, targets=kw.pop("targets", dt.SITES), **kw)
            nll = np.load(path)
            assert nll.dtype == np.float64 and len(nll) == val.n == r["targets"] == len(toks) - 1  # C4
            assert r["legal"] is True and np.isfinite(nll).all()
            cache[key] = (r, nll)
        return cache[key]
    return SimpleNamespace(cfg=cfg, model=model, tokens=tokens, run=run_eval, starts=dt.doc_starts(tokens, len(tokens) - 1))


def reference_nll(model, tokens, chunk, context):
    """By hand: target j of the document starting at s, at offset o = j - s, is predicted from the document's
    tokens [max(s, e - context), j] where e = s + the end of o's chunk (the base model, no adaptation)."""
    n = len(tokens) - 1
    bos = [0] + [i for i in range(1, n) if tokens[i] == dt.BOS_ID] + [n]
    out = np.zeros(n)
    with torch.no_grad():
        for s, s_next in zip(bos, bos[1:]):
            for c0 in range(s, s_next, chunk):
                e = min(c0 + chunk, s_next)
                w = max(s, e - context)
                x = torch.from_numpy(tokens[w:e].astype(np.int64))[None]
                logp = torch.log_softmax(model.logits(model.hidden(x))[0].double(), -1)
                for j in range(c0, e):
                    out[j] = -logp[j - w, int(tokens[j + 1])].item()
    return out


# ---------------------------------------------------------------------------------------------------------------
# documents and plans
# ---------------------------------------------------------------------------------------------------------------


def test_documents_tile_the_targets():
    toks = np.array([5, 6, 1, 7, 1, 1, 8, 9, 1])  # no BOS first; a lone BOS; the last token a BOS
    s = dt.doc_starts(toks, len(toks) - 1)
    assert s.tolist() == [0, 2, 4, 5]  # the BOS at 8 (the last token) is only a target
    lens = np.diff(np.append(s, len(toks) - 1))
    assert lens.tolist() == [2, 2, 1, 3] and lens.sum() == len(toks) - 1
    assert dt.doc_starts(np.array([1, 5, 6]), 2).tolist() == [0]  # a stream that starts with BOS


@pytest.mark.parametrize("m", [1, 15, 16, 17, 64, 65, 200])
def test_plans_cover_each_target_once_with_its_documents_tokens(m):
    for plan in (dt.chunk_plan(m, CHUNK, CTX), dt.plain_plan(m, CTX)):
        assert np.array_equal(np.concatenate([np.arange(cs, ce) for _, cs, ce in plan]), np.arange(m))
        assert (plan[:, 0] >= 0).all() and (plan[:, 2] - plan[:, 0] <= CTX).all() and (plan[:, 0] <= plan[:, 1]).all()
    p = dt.chunk_plan(m, CHUNK, CTX)
    assert (p[:, 2] - p[:, 1] <= CHUNK).all() and (p[:, 0] == np.maximum(p[:, 2] - CTX, 0)).all()


def test_ranks_get_contiguous_documents_of_equal_cost():
    costs = np.array([5, 1, 1, 1, 1, 1, 10, 2, 2, 2], float)
    b = dt.split_docs(costs, 3)
    assert b[0] == 0 and b[-1] == 10 and (np.diff(b) >= 0).all()
    assert dt.split_docs(costs, 1).tolist() == [0, 10]
    assert dt.split_docs(np.ones(2), 4).tolist()[-1] == 2  # more ranks than documents: some get none


# ---------------------------------------------------------------------------------------------------------------
# (a) C4 and the reference forward
# ---------------------------------------------------------------------------------------------------------------


def test_zero_lr_is_the_per_document_forward(setup):
    _, nll = setup.run(setup.tokens, lr=0.0)
    ref = reference_nll(setup.model, setup.tokens, CHUNK, CTX)
    np.testing.assert_allclose(nll, ref, rtol=0, atol=2e-5)
    _, nll1 = setup.run(setup.tokens, lr=0.0, batch=1)
    np.testing.assert_allclose(nll1, ref, rtol=0, atol=2e-5)


def test_adaptation_starts_at_the_base_model_and_then_moves(setup):
    _, base = setup.run(setup.tokens, lr=0.0)
    _, nll = setup.run(setup.tokens, lr=0.05)
    n = len(setup.tokens) - 1
    s = np.append(setup.starts, n)
    first = np.zeros(n, bool)  # each document's first chunk: scored before any step, so B = 0 there
    for a, b in zip(s, s[1:]):
        first[a:min(a + CHUNK, b)] = True
    assert np.array_equal(nll[first], base[first])
    assert np.median(np.abs(nll[~first] - base[~first])) > 1e-4


def test_a_subset_of_sites(setup):
    _, base = setup.run(setup.tokens, lr=0.0)
    for sites in (("o",), ("q", "v"), ("up", "down"), ("head",)):
        _, nll = setup.run(setup.tokens, lr=0.05, targets=sites)
        assert 0 < np.abs(nll - base).max()
    with pytest.raises(ValueError):
        setup.run(setup.tokens, targets=("lm_head",))


# ---------------------------------------------------------------------------------------------------------------
# (b) C1/C3 by perturbation, (c) documents' independence, (d) a planted leak
# ---------------------------------------------------------------------------------------------------------------


def positions(setup):
    """{where: token position t}; the target that t labels is t-1."""
    s = setup.starts
    return {"mid_chunk": int(s[5]) + 20 + 5, "chunk_first": int(s[7]) + 2 * CHUNK + 1, "doc_first": int(s[5]) + 1,
            "first_of_stream": 1, "bos_target": int(s[7]), "bos_of_short_doc": int(s[4]),
            "sliding_doc": int(s[13]) + 150, "last": len(setup.tokens) - 1}


def perturbed(tokens, t, value=None):
    out = tokens.copy()
    out[t] = value if value is not None else (7 if tokens[t] == dt.BOS_ID else (int(tokens[t]) * 7 + 11) % 1023 + 2)
    assert out[t] != tokens[t]
    return out


def same_documents(a, b):
    return np.array_equal(dt.doc_starts(a, len(a) - 1), dt.doc_starts(b, len(b) - 1))


def check_causal(base, nll, t, structure_kept, where):
    """Targets before t-1 keep their scores: bit for bit, or within float noise where the document boundaries
    changed (the batches, sorted by length, then hold other rows and pad to other lengths)."""
    if structure_kept:
        assert np.array_equal(nll[:t - 1], base[:t - 1]), (where, t, np.abs(nll[:t - 1] - base[:t - 1]).max())
    else:
        np.testing.assert_allclose(nll[:t - 1], base[:t - 1], rtol=0, atol=1e-5, err_msg=f"{where} t={t}")


@pytest.mark.parametrize("where", ["mid_chunk", "chunk_first", "doc_first", "first_of_stream", "bos_target",
                                   "bos_of_short_doc", "sliding_doc", "last"])
def test_a_token_moves_no_earlier_score(setup, where):
    t = positions(setup)[where]
    _, base = setup.run(setup.tokens)
    toks = perturbed(setup.tokens, t)
    _, nll = setup.run(toks)
    check_causal(base, nll, t, same_documents(setup.tokens, toks), where)
    assert nll[t - 1] != base[t - 1]  # its own label changed
    if where not in ("last", "bos_target", "bos_of_short_doc"):
        doc_end = np.append(setup.starts, len(base))[np.searchsorted(setup.starts, t, side="right")]
        assert np.abs(nll[t:doc_end] - base[t:doc_end]).max() > 0  # and the document's later targets see it


def test_a_new_bos_splits_a_document_causally(setup):
    t = int(setup.starts[7]) + 40
    _, base = setup.run(setup.tokens)
    toks = perturbed(setup.tokens, t, dt.BOS_ID)
    _, nll = setup.run(toks)
    check_causal(base, nll, t, False, "new_bos")
    _, base1 = setup.run(setup.tokens, batch=1)
    _, nll1 = setup.run(toks, batch=1)
    assert np.array_equal(nll1[:int(setup.starts[7])], base1[:int(setup.starts[7])])


def test_documents_are_independent(setup):
    """Perturbing tokens inside document 7 (batched with others) changes no target outside its own targets."""
    s = np.append(setup.starts, len(setup.tokens) - 1)
    a, b = int(s[7]), int(s[8])
    toks = setup.tokens.copy()
    rng = np.random.default_rng(1)
    inner = np.arange(a + 1, b)
    toks[inner] = rng.integers(2, 1024, len(inner))
    assert same_documents(setup.tokens, toks)
    for batch in (4, 16):
        _, base = setup.run(setup.tokens, batch=batch)
        _, nll = setup.run(toks, batch=batch)
        outside = np.ones(len(base), bool)
        outside[a:b] = False
        assert np.array_equal(nll[outside], base[outside]), batch
        assert np.abs(nll[a:b] - base[a:b]).max() > 1e-2


def train_then_score(real):
    """Planted leak: each chunk is trained on first (one full step on its own targets), then scored."""
    def chunk_step(nll_fn, lora, x, y, scored, n_train, lr):
        real(nll_fn, lora, x, y, scored, x.size(0), lr)
        return real(nll_fn, lora, x, y, scored, n_train, lr)
    return chunk_step


def test_planted_train_before_score_leak_fails_the_check(setup, monkeypatch):
    t = positions(setup)["mid_chunk"]
    _, base_ok = setup.run(setup.tokens)
    monkeypatch.setattr(dt, "chunk_step", train_then_score(dt.chunk_step))
    val = lambda toks: tg.ValData(setup.cfg, tokens=toks)  # noqa: E731
    out = []
    for toks in (setup.tokens, perturbed(setup.tokens, t)):
        path = str(setup.cfg.run_dir) + "/leak.npy"
        dt.eval_doc_lora_ttt(setup.model, val(toks), setup.cfg, dist1(), lambda m: None, time.perf_counter() + 600,
                             path, rank=4, chunk=CHUNK, lr=0.05, docs_per_batch=4, targets=dt.SITES)
        out.append(np.load(path))
    base, nll = out
    assert not np.array_equal(base, base_ok)  # the leak is live
    with pytest.raises(AssertionError):
        check_causal(base, nll, t, True, "leak")
    chunk_start = t - 1 - (t - 1 - int(setup.starts[5])) % CHUNK
    assert np.abs(nll[chunk_start:t - 1] - base[chunk_start:t - 1]).max() > 1e-4  # earlier targets of t's chunk


# ---------------------------------------------------------------------------------------------------------------
# C2 at the edges: the scores over every value of the label sum to 1 (a 32-token vocabulary)
# ---------------------------------------------------------------------------------------------------------------

V = 32


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    run = tmp_path_factory.mktemp("doc_ttt_c2")
    cfg = smoke_cfg(run, vocab_size=V, eval_seq_len=32, eval_stride=32)
    model = randomize(tg.GPT(cfg), seed=5, std=0.1)
    with torch.no_grad():
        model.tok_emb.weight.mul_(4.0)  # peaked predictions, so a leak of the label would show
    toks = np.random.default_rng(2).integers(2, V, 121).astype(np.uint16)
    toks[[0, 50, 90]] = dt.BOS_ID  # documents at 0 (50 targets), 50 (40), 90 (30)
    return SimpleNamespace(cfg=cfg, model=model, tokens=toks, run=run)


@pytest.mark.parametrize("target", [50 + 2 * 8, 90, 89])  # a chunk's first (3rd chunk), a document's first, a BOS
def test_edge_targets_score_a_normalized_distribution(small_vocab, target):
    s = small_vocab
    total = 0.0
    for v in range(V):  # v = BOS starts a document there: the target's window and adapters are the same
        toks = s.tokens.copy()
        toks[target + 1] = v
        path = str(s.run / "c2.npy")
        dt.eval_doc_lora_ttt(s.model, tg.ValData(s.cfg, tokens=toks), s.cfg, dist1(), lambda m: None,
                             time.perf_counter() + 600, path, rank=4, chunk=8, lr=0.1, docs_per_batch=2, targets=dt.SITES)
        total += math.exp(-np.load(path)[target])
    assert abs(total - 1.0) < 1e-4, total


# ---------------------------------------------------------------------------------------------------------------
# (e) the model is left as it was, (f) adaptation helps, the budget, ranks
# ---------------------------------------------------------------------------------------------------------------


def model_state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()],
            model.training, [(m.fused) for b in model.blocks for m in (b.attn, b.mlp)],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def assert_same_state(model, before):
    sd, rg, training, fused, hooks = model_state(model)
    assert sd.keys() == before[0].keys() and all(torch.equal(sd[k], before[0][k]) for k in sd)
    assert (rg, training, fused, hooks) == before[1:]
    assert fast.attn_inputs is REAL_ATTN_INPUTS and all(p.grad is None for p in model.parameters())
    assert "logits" not in model.__dict__ and model.logits.__func__ is tg.GPT.logits


REAL_ATTN_INPUTS = fast.attn_inputs


def test_the_model_is_left_untouched(setup, monkeypatch):
    model = copy.deepcopy(setup.model).train()
    model.blocks[1].attn.fused = False  # a mix of flags, to see each restored
    before = model_state(model)
    setup.run(setup.tokens, model_=model, lr=0.05)
    assert_same_state(model, before)
    calls = []

    def failing(*a, **k):  # an error mid-run: everything is restored all the same
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*a, **k)
    real = dt.chunk_step
    monkeypatch.setattr(dt, "chunk_step", failing)
    with pytest.raises(RuntimeError, match="boom"):
        setup.run(setup.tokens, model_=model, lr=0.05)
    assert_same_state(model, before)


def test_loaded_artifact_model(tmp_path, trained):
    """As final_eval gets it: from the artifact, QATLinear.quantized off; hooks reach every site."""
    cfg = copy.deepcopy(trained["cfg"])
    cfg.run_dir = str(tmp_path)
    path, _ = tg.write_artifact(trained["model"], cfg, dist1(), tg.Log(dist1(), None))
    model, mcfg = tg.load_artifact(path, torch.device("cpu"))
    assert not any(m.quantized for m in model.modules() if isinstance(m, tg.QATLinear))
    mcfg.tokenizer_path, mcfg.eval_seq_len = str(TOKENIZER), CTX
    toks = make_stream()
    before = model_state(model)
    lines = []
    r = dt.eval_doc_lora_ttt(model, tg.ValData(mcfg, tokens=toks), mcfg, dist1(), lines.append,
                             time.perf_counter() + 600, None, rank=4, chunk=CHUNK, lr=0.01, docs_per_batch=8,
                             targets=dt.SITES)
    assert r["targets"] == len(toks) - 1 and any(line.startswith("final_ttt") for line in lines)
    assert any("eval:ttt_lora 100%" in line for line in lines)
    assert_same_state(model, before)


def test_adaptation_learns_a_repeated_document(trained):
    """A document that repeats a 24-token phrase: with lr > 0 its later chunks score lower than without."""
    cfg = copy.deepcopy(trained["cfg"])
    cfg.eval_seq_len = 64
    phrase = val_tokens(200)[100:124].astype(np.int64)
    phrase[phrase == dt.BOS_ID] = 5
    toks = np.concatenate(([dt.BOS_ID], np.tile(phrase, 12), [dt.BOS_ID])).astype(np.uint16)
    val = tg.ValData(cfg, tokens=toks)
    res = {}
    for lr in (0.0, 0.03):
        path = str(trained["run"] / f"rep_{lr}.npy")
        dt.eval_doc_lora_ttt(trained["model"], val, cfg, dist1(), lambda m: None, time.perf_counter() + 600, path,
                             rank=8, chunk=CHUNK, lr=lr, docs_per_batch=4)
        res[lr] = np.load(path)
    late = slice(len(toks) // 2, len(toks) - 2)
    assert res[0.03][late].mean() < res[0.0][late].mean() - 0.5, (res[0.03][late].mean(), res[0.0][late].mean())


def test_no_budget_scores_every_target_without_adaptation(setup):
    lines = []
    _, base = setup.run(setup.tokens, lr=0.0)
    _, nll = setup.run(setup.tokens, lr=0.05, deadline_s=-1.0, log=lines.append)
    lens = np.diff(np.append(setup.starts, len(setup.tokens) - 1))
    offset = np.arange(len(base)) - np.repeat(setup.starts, lens)
    fits = offset < CTX  # there plain windows hold the same context as the chunks' (the document's whole prefix)
    np.testing.assert_allclose(nll[fits], base[fits], rtol=0, atol=2e-5)
    assert np.abs(nll[~fits] - base[~fits]).max() > 0
    multi = lens > CHUNK
    text = "\n".join(lines)
    assert f"{multi.sum()} documents, {lens[multi].sum()} targets scored without adaptation" in text
    assert f"single_chunk_targets:{lens[~multi].sum()} unadapted_after_budget:{lens[multi].sum()}" in text


def test_budget_stops_adapting_between_batches(setup, monkeypatch):
    """A clock that moves only while a batch adapts (100 s each): the first batch adapts, its time says the next
    would pass the deadline, so the remaining documents are scored by the base model."""
    clock = [0.0]
    monkeypatch.setattr(dt, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    real = dt.adapt_batch

    def timed(*a, **k):
        real(*a, **k)
        clock[0] += 100.0
    monkeypatch.setattr(dt, "adapt_batch", timed)
    lines = []
    val = tg.ValData(setup.cfg, tokens=setup.tokens)
    path = str(setup.cfg.run_dir) + "/budget.npy"
    dt.eval_doc_lora_ttt(setup.model, val, setup.cfg, dist1(), lines.append, 101.0, path, rank=4, chunk=CHUNK,
                         lr=0.05, docs_per_batch=4, targets=dt.SITES)
    nll = np.load(path)
    lens = np.diff(np.append(setup.starts, len(setup.tokens) - 1))
    order = np.argsort(-np.where(lens > CHUNK, lens, 0), kind="stable")[:(lens > CHUNK).sum()]
    first, rest = order[:4], order[4:]
    assert f"eval budget reached at batch 2/3 (rank 0): {len(rest)} documents, {lens[rest].sum()} targets" in "\n".join(lines)
    _, adapted = setup.run(setup.tokens, lr=0.05)
    _, base = setup.run(setup.tokens, lr=0.0)
    doc = np.repeat(np.arange(len(lens)), lens)
    offset = np.arange(len(nll)) - np.repeat(setup.starts, lens)
    in_first = np.isin(doc, first)
    assert np.array_equal(nll[in_first], adapted[in_first])  # the first batch: as without a deadline
    fits = ~in_first & (offset < CTX)
    np.testing.assert_allclose(nll[fits], base[fits], rtol=0, atol=2e-5)  # the rest: the base model


class FakeRank(tg.Dist):
    """Rank r of `world`, alone: collectives are identities (reduce_score is replaced below)."""

    def all_reduce(self, t, op=None):
        return t


def test_ranks_split_documents_and_tile_the_stream(setup, monkeypatch):
    _, whole = setup.run(setup.tokens)
    val = tg.ValData(setup.cfg, tokens=setup.tokens)
    for world in (2, 3, 40):
        segs = []
        monkeypatch.setattr(tg, "reduce_score", lambda parts, *a, **k: segs.extend(parts) or {})
        for r in range(world):
            dt.eval_doc_lora_ttt(setup.model, val, setup.cfg, FakeRank(r, world, torch.device("cpu")), lambda m: None,
                                 time.perf_counter() + 600, None, rank=4, chunk=CHUNK, lr=0.05, docs_per_batch=4,
                                 targets=dt.SITES)
        segs.sort(key=lambda p: p[0])
        assert [t for t, _ in segs] == list(np.cumsum([0] + [len(x) for _, x in segs[:-1]]))  # contiguous, in order
        got = np.concatenate([x for _, x in segs])
        assert len(got) == val.n
        np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# bench/doc_ttt_probe.py
# ---------------------------------------------------------------------------------------------------------------


def test_probe_runs_on_an_artifact(tmp_path, trained, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import doc_ttt_probe
    cfg = copy.deepcopy(trained["cfg"])
    cfg.run_dir, cfg.eval_seq_len, cfg.eval_stride = str(tmp_path / "art"), CTX, 32
    path, _ = tg.write_artifact(trained["model"], cfg, dist1(), tg.Log(dist1(), None))
    data = tmp_path / "data"
    write_shard(data / "fineweb_val_000000.bin", np.tile(make_stream(), 2))
    toks = np.fromfile(data / "fineweb_val_000000.bin", dtype="<u2")[512:]
    assert (toks == dt.BOS_ID).sum() > 2
    monkeypatch.setenv("DATA_PATH", str(data))
    monkeypatch.setenv("TOKENIZER_PATH", str(TOKENIZER))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        doc_ttt_probe.main([path, "--targets", "1500", "--rank", "4", "--chunk", "16,32", "--lr", "0.01",
                            "--batch", "8", "--warmup", "100", "--out", str(tmp_path / "nll")])
    text = out.getvalue()
    assert "eval_seq_len:64 stride:32" in text  # the artifact's settings
    for mode in ("sliding", "lora_r4_c16_lr0.01_b8", "lora_r4_c32_lr0.01_b8"):
        nll = np.load(tmp_path / "nll" / f"{mode}.npy")
        assert len(nll) == 1500 and np.isfinite(nll).all()
        assert any(line.startswith(mode) for line in text.splitlines())
    assert "vs sliding (paired by document)" in text
    with pytest.raises(SystemExit):
        doc_ttt_probe.main([path, "--sites", "q,lm_head"])


def test_train_gpt_dispatches_ttt_lora_rank(tmp_path, trained, small_data):
    """TTT_LORA_RANK > 0 makes train_gpt's TTT mode (the score) this per-document LoRA TTT, with its settings;
    every target scored once, and the artifact records the settings for a later --eval-only."""
    cfg = copy.deepcopy(trained["cfg"])
    cfg.run_dir = str(tmp_path / "art")
    path, _ = tg.write_artifact(trained["model"], cfg, dist1(), tg.Log(dist1(), None))
    out = tmp_path / "ev"
    tg.main(["--preset", "smoke", "--eval-only", path, "--data-path", str(small_data), "--tokenizer-path",
             str(TOKENIZER), "--run-dir", str(out), "--slot", "off", "--ttt-lora-rank", "4", "--ttt-doc-chunk", "32",
             "--ttt-lora-sites", "q,v", "--ttt-lora-lr", "0.01", "--save-nll", str(out / "nll.npy")])
    text = (out / "eval.log").read_text()
    assert "ttt_lora: docs:" in text and "rank:4 chunk:32 lr:0.01" in text and "sites:q,v" in text
    loss = float(text.split("final_ttt val_loss:")[1].split()[0])
    nll = np.load(out / "nll.npy")
    assert len(nll) == 8192 and nll.mean() == pytest.approx(loss, abs=1e-8)


@pytest.mark.parametrize("flag,value", [("--ttt-lora-rank", "-1"), ("--ttt-doc-chunk", "0"), ("--ttt-doc-batch", "0"),
                                        ("--ttt-lora-sites", "q,x"), ("--ttt-lora-sites", "")])
def test_bad_doc_ttt_settings_are_refused(flag, value):
    with pytest.raises(tg.InputError, match="TTT_"):
        tg.build_config("smoke", flags={flag.lstrip("-").replace("-", "_"): value}, env={})
