"""Evaluation section: exact val_bpb, window coverage, --save-nll, and the legality conditions of every
eval mode (rules §1.4): C1/C3 (a target's score never depends on tokens after it), C2 (scores are a
normalized distribution over the vocabulary), C4 (every target scored exactly once).

Legality is tested by perturbation: change the token at position t and compare the per-target NLL arrays
written by save_nll. Target j predicts token j+1 from tokens <= j, so targets j < t-1 must not move."""
import copy
import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import TOKENIZER, dist1, quiet_log, randomize, smoke_cfg, tg, val_tokens, write_shard

SLOT = {"sliding": "off", "slot_causal": "causal", "slot_reference": "reference"}


def run_mode(mode, model, cfg, tokens, path, log=None, deadline_s=600.0):
    """One full eval of `tokens` in `mode` on a copy of `model`; returns (result dict, per-target NLL)."""
    m = copy.deepcopy(model)
    val = tg.ValData(cfg, tokens=np.asarray(tokens, dtype=np.uint16))
    log = log or quiet_log()
    if mode.startswith("ttt"):
        r = tg.eval_ttt(m, val, cfg, dist1(), log, deadline=time.perf_counter() + deadline_s, save_nll=str(path))
    else:
        r = tg.evaluate(m, val, cfg, dist1(), cfg.eval_stride, name=mode, slot=SLOT[mode], log=log,
                        save_nll=str(path))
    nll = np.load(path)
    assert nll.dtype == np.float64
    assert r["targets"] == val.n == len(nll) == len(tokens) - 1  # C4
    return r, nll


def window_of(ends, j):
    """Index of the window that scores target j."""
    return int(np.searchsorted(ends, j, side="right"))


# ---------------------------------------------------------------------------------------------------
# exact metric
# ---------------------------------------------------------------------------------------------------

DOCS = ["The quick brown fox jumps over the lazy dog, then runs back home.",
        "Parameter golf: train the best language model that fits in sixteen megabytes.",
        "A third document with 42 numbers and punctuation; isn't it nice?"]


def hand_bytes(sp, docs):
    """Tokens [BOS doc BOS doc ...] and, per target, the UTF-8 bytes it adds to its document's decoded text."""
    tokens, nbytes = [], []
    for doc in docs:
        ids = sp.encode(doc)
        assert sp.decode(ids) == doc  # the tokenizer round-trips this text
        tokens.append(sp.bos_id())
        nbytes.append(0)  # target BOS: no text
        for i in range(len(ids)):
            nbytes.append(len(sp.decode(ids[:i + 1]).encode()) - len(sp.decode(ids[:i]).encode()))
        tokens.extend(ids)
    return np.array(tokens, dtype=np.uint16), np.array(nbytes[1:])  # the first token is no target


def test_val_bytes_match_the_text(tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    tokens, by_hand = hand_bytes(sp, DOCS)
    cfg = smoke_cfg(tmp_path)
    val = tg.ValData(cfg, tokens=tokens)
    assert val.n == len(tokens) - 1
    assert np.array_equal(val.bytes, by_hand)
    assert val.bytes.sum() == sum(len(d.encode()) for d in DOCS)
    # non-ASCII text goes through byte-fallback pieces; only the total is checked there
    docs = ["caf\u00e9 na\u00efve \u6771\u4eac stra\u00dfe", "\u00fcber \u00e0 la carte"]
    tokens = np.array(sum(([sp.bos_id()] + sp.encode(d) for d in docs), []), dtype=np.uint16)
    assert any(sp.is_byte(int(i)) for i in tokens)
    assert tg.ValData(cfg, tokens=tokens).bytes.sum() == sum(len(d.encode()) for d in docs)


def test_val_bpb_by_hand(tmp_path, trained_model):
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    tokens, nbytes = hand_bytes(sp, DOCS)
    n = len(tokens) - 1
    cfg = smoke_cfg(tmp_path, eval_seq_len=256)
    assert n < cfg.eval_seq_len  # one window: every target sees all of its prefix
    x = torch.from_numpy(tokens[:-1].astype(np.int64))[None]
    y = torch.from_numpy(tokens[1:].astype(np.int64))
    with torch.no_grad():
        logits = trained_model.logits(trained_model.hidden(x))[0].double()
    nll = -torch.log_softmax(logits, -1)[torch.arange(n), y].numpy()
    loss, bpb = nll.mean(), nll.sum() / math.log(2) / nbytes.sum()
    val = tg.ValData(cfg, tokens=tokens)
    for mode, stride in (("raw", cfg.eval_seq_len), ("sliding", 16)):
        r = tg.evaluate(trained_model, val, cfg, dist1(), stride, name=mode, log=quiet_log(),
                        save_nll=str(tmp_path / f"{mode}.npy"))
        assert r["targets"] == n and r["legal"] is True
        assert r["val_loss"] == pytest.approx(loss, rel=1e-6)
        assert r["val_bpb"] == pytest.approx(bpb, rel=1e-6)
        np.testing.assert_allclose(np.load(tmp_path / f"{mode}.npy"), nll, rtol=1e-5, atol=1e-5)
    assert 1.0 < bpb < 6.0


def test_sliding_context_by_hand(tmp_path, trained_model):
    """Stride 1: target j is predicted from exactly tokens[max(0, j+1-L) : j+1]."""
    L = 24
    cfg = smoke_cfg(tmp_path, eval_seq_len=L, eval_stride=1, eval_batch_seqs=7)
    tokens = val_tokens(81)
    r, nll = run_mode("sliding", trained_model, cfg, tokens, tmp_path / "nll.npy")
    by_hand = []
    with torch.no_grad():
        for j in range(len(tokens) - 1):
            ctx = torch.from_numpy(tokens[max(0, j + 1 - L):j + 1].astype(np.int64))[None]
            logp = torch.log_softmax(trained_model.logits(trained_model.hidden(ctx))[0, -1].double(), -1)
            by_hand.append(-logp[int(tokens[j + 1])].item())
    np.testing.assert_allclose(nll, by_hand, rtol=1e-5, atol=1e-5)


def test_save_nll_matches_val_loss(tmp_path, trained_model):
    cfg = smoke_cfg(tmp_path, eval_seq_len=64, eval_stride=24)
    tokens = val_tokens(3001)
    r, nll = run_mode("sliding", trained_model, cfg, tokens, tmp_path / "nll")  # no .npy suffix: path as given
    assert (tmp_path / "nll").exists() and len(nll) == 3000
    assert nll.sum() / len(nll) == pytest.approx(r["val_loss"], rel=1e-12)
    val = tg.ValData(cfg, tokens=tokens)
    assert nll.sum() / math.log(2) / val.bytes.sum() == pytest.approx(r["val_bpb"], rel=1e-12)
    assert (nll > 0).all() and np.isfinite(nll).all()
    assert not list(tmp_path.glob("*.tmp*"))


def test_cli_eval_only_save_nll(tmp_path, trained, small_data, capsys):
    cfg = copy.deepcopy(trained["cfg"])
    cfg.run_dir = str(tmp_path / "art")
    path, _ = tg.write_artifact(trained["model"], cfg, dist1(), quiet_log())
    out = tmp_path / "ev"
    tg.main(["--preset", "smoke", "--eval-only", path, "--data-path", str(small_data), "--tokenizer-path",
             str(TOKENIZER), "--run-dir", str(out), "--ttt", "0", "--slot", "off", "--eval-stride", "64",
             "--save-nll", str(out / "nll.npy")])
    text = (out / "eval.log").read_text()
    loss = float(text.split("final_sliding val_loss:")[1].split()[0])
    nll = np.load(out / "nll.npy")
    assert nll.dtype == np.float64 and len(nll) == 8192
    assert nll.mean() == pytest.approx(loss, abs=1e-8)  # the log prints 8 decimals


def test_cli_eval_only_refuses_bad_artifact(tmp_path, capsys):
    bad = tmp_path / "x.hqa"
    bad.write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        tg.main(["--preset", "smoke", "--eval-only", str(bad), "--run-dir", str(tmp_path / "ev")])
    assert e.value.code == 2 and str(bad) in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# windows
# ---------------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=300)
@given(n=st.integers(1, 3000), L=st.integers(1, 300), data=st.data())
def test_window_ends_cover_every_target_once(n, L, data):
    stride = data.draw(st.integers(1, L))
    ends = tg.window_ends(n, L, stride)
    W = int(ends[0])
    assert W == min(L, n) and ends[-1] == n
    assert (np.diff(ends) > 0).all() and (np.diff(ends) <= stride).all()
    starts = np.concatenate(([0], ends[:-1]))
    covered = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
    assert np.array_equal(covered, np.arange(n))  # every target exactly once, in order
    assert (ends - W >= 0).all()  # windows stay inside the stream
    if len(ends) > 1:  # every later target keeps at least L - stride tokens of context
        assert (ends[1:] - W <= starts[1:] - (W - stride)).all()


@pytest.mark.parametrize("n,L,stride,bs", [(1000, 64, 16, 5), (50, 64, 16, 4), (64, 64, 64, 1), (300, 32, 7, 32)])
def test_window_batch_scored_masks(n, L, stride, bs):
    tokens = np.arange(n + 1, dtype=np.uint16)  # token value == its position
    val = SimpleNamespace(tokens=tokens)
    ends = tg.window_ends(n, L, stride)
    seen = []
    for b in range(0, len(ends), bs):
        ks = np.arange(b, min(b + bs, len(ends)))
        x, y, scored = tg.window_batch(val, ends, ks, dist1())
        assert torch.equal(y, x + 1)
        seen.append(x[scored].numpy())  # target j has input token j
    assert np.array_equal(np.concatenate(seen), np.arange(n))


# ---------------------------------------------------------------------------------------------------
# legality: C1/C3 + C4 by perturbation, on a 1024-vocab model and 3000 real val targets
# ---------------------------------------------------------------------------------------------------

L, STRIDE, BATCH, CHUNK = 128, 32, 8, 512
T_VALUES = [700, 1490, 2600]  # TTT chunks 1, 2 and 5 (of 6); 1490 is mid-window, mid-batch


@pytest.fixture(scope="module")
def legal_setup(trained, tmp_path_factory):
    run = tmp_path_factory.mktemp("legal")
    cfg = smoke_cfg(run, eval_seq_len=L, eval_stride=STRIDE, eval_batch_seqs=BATCH, ttt_chunk_tokens=CHUNK,
                    ttt_epochs=1, ttt_lr=0.05, slot_steps=3, slot_lr=0.1)
    tokens = val_tokens(3001)
    cache = {}

    def run_cached(mode, toks, cfg_=cfg):
        key = (mode, toks.tobytes(), cfg_.ttt_optimizer)
        if key not in cache:
            cache[key] = run_mode(mode, trained["model"], cfg_, toks, run / f"{len(cache)}.npy")
        return cache[key]
    return SimpleNamespace(cfg=cfg, tokens=tokens, run=run_cached, ends=tg.window_ends(3000, L, STRIDE),
                           model=trained["model"])


def perturb(tokens, t, vocab, seed=0):
    out = tokens.copy()
    out[t] = (int(tokens[t]) + 1 + np.random.default_rng(seed + t).integers(0, vocab - 1)) % vocab
    assert out[t] != tokens[t]
    return out


@pytest.mark.parametrize("mode", ["sliding", "ttt", "ttt_muon", "slot_causal"])
def test_legal_modes_ignore_the_future(legal_setup, mode):
    s = legal_setup
    cfg = s.cfg
    if mode == "ttt_muon":
        cfg = copy.deepcopy(cfg)
        cfg.ttt_optimizer = "muon"
    r, base = s.run(mode.removesuffix("_muon"), s.tokens, cfg)
    assert r["legal"] is True
    for t in T_VALUES:
        w = window_of(s.ends, t - 1)
        assert s.ends[w - 1] < t - 1 < s.ends[w] - 1  # target t-1 sits inside a scored slice
        _, nll = s.run(mode.removesuffix("_muon"), perturb(s.tokens, t, cfg.vocab_size), cfg)
        assert np.array_equal(nll[:t - 1], base[:t - 1]), (mode, t, np.abs(nll[:t - 1] - base[:t - 1]).max())
        assert nll[t - 1] != base[t - 1]  # its own label changed
        assert np.abs(nll[t:t + 8] - base[t:t + 8]).max() > 0  # the change is seen afterwards
        far = t + L  # targets whose windows can no longer see token t
        if mode.startswith("ttt") and t // CHUNK < 3000 // CHUNK:
            # ... but TTT learned from it: every later chunk is scored by a model that adapted on it
            assert np.abs(nll[far:] - base[far:]).max() > 1e-6, (mode, t)
        elif not mode.startswith("ttt"):
            assert np.array_equal(nll[far:], base[far:]), (mode, t)


@pytest.mark.parametrize("mode", ["ttt", "ttt_muon", "slot_causal"])
def test_adaptation_changes_scores(legal_setup, mode):
    """Not vacuous: TTT and causal SLOT do change the scores relative to plain sliding windows, except where
    they have nothing to adapt on yet (TTT's first chunk, SLOT's first window)."""
    s = legal_setup
    cfg = copy.deepcopy(s.cfg)
    if mode == "ttt_muon":
        cfg.ttt_optimizer = "muon"
    _, sliding = s.run("sliding", s.tokens)
    _, nll = s.run(mode.removesuffix("_muon"), s.tokens, cfg)
    first = CHUNK if mode.startswith("ttt") else int(s.ends[0])
    np.testing.assert_allclose(nll[:first], sliding[:first], rtol=0, atol=1e-6)
    diff = np.abs(nll[first:] - sliding[first:])
    assert diff.max() > 1e-3 and np.median(diff) > 1e-5, (diff.max(), np.median(diff))


def test_ttt_with_zero_lr_or_no_budget_equals_sliding(legal_setup, tmp_path):
    s = legal_setup
    _, sliding = s.run("sliding", s.tokens)
    cfg = copy.deepcopy(s.cfg)
    cfg.ttt_lr = 0.0
    _, nll = run_mode("ttt", s.model, cfg, s.tokens, tmp_path / "a.npy")
    np.testing.assert_allclose(nll, sliding, rtol=0, atol=1e-6)
    log = quiet_log(tmp_path / "log")
    _, nll = run_mode("ttt", s.model, s.cfg, s.tokens, tmp_path / "b.npy", log=log, deadline_s=-1.0)
    np.testing.assert_allclose(nll, sliding, rtol=0, atol=1e-6)
    assert "eval budget reached at chunk 1/6" in (tmp_path / "log").read_text()


def test_reference_slot_fails_the_perturbation_check(legal_setup, tmp_path):
    s = legal_setup
    r, base = s.run("slot_reference", s.tokens)
    assert r["legal"] is False
    t = 1490
    w = window_of(s.ends, t - 1)
    batch_start = w // BATCH * BATCH
    assert w > batch_start  # earlier windows share t's batch and its delta
    _, nll = s.run("slot_reference", perturb(s.tokens, t, s.cfg.vocab_size))
    earlier = slice(int(s.ends[batch_start - 1]), t - 1)  # targets before t-1 in t's batch
    assert np.abs(nll[earlier] - base[earlier]).max() > 1e-7  # C1/C3 violated: the future moved the past
    before_batch = slice(0, int(s.ends[batch_start - 1]))
    assert np.array_equal(nll[before_batch], base[before_batch])  # earlier batches are untouched
    log = quiet_log(tmp_path / "log")
    cfg = s.cfg
    tg.evaluate(copy.deepcopy(s.model), tg.ValData(cfg, tokens=s.tokens[:600]), cfg, dist1(), STRIDE,
                name="slot_reference", slot="reference", log=log)
    assert "NOT RECORD-LEGAL" in (tmp_path / "log").read_text()


def test_legal_flags(tmp_path, trained_model):
    cfg = smoke_cfg(tmp_path, eval_seq_len=64, eval_stride=32, ttt_chunk_tokens=256, slot_steps=1)
    tokens = val_tokens(700)
    got = {m: run_mode(m, trained_model, cfg, tokens, tmp_path / f"{m}.npy")[0]["legal"]
           for m in ("sliding", "ttt", "slot_causal", "slot_reference")}
    assert got == {"sliding": True, "ttt": True, "slot_causal": True, "slot_reference": False}
    assert tg.LEGAL["raw"] and tg.LEGAL["roundtrip"]


# ---------------------------------------------------------------------------------------------------
# legality: C2 -- for one scored position, the scores over all possible tokens form a distribution
# ---------------------------------------------------------------------------------------------------

V, T_C2 = 32, 150  # 256 targets; target 149 is inside window 15's scored slice, TTT chunk 2 of 4, batch 3


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    run = tmp_path_factory.mktemp("c2")
    cfg = smoke_cfg(run, vocab_size=V, eval_seq_len=32, eval_stride=8, eval_batch_seqs=4, ttt_chunk_tokens=64,
                    ttt_epochs=1, ttt_lr=0.05, slot_steps=3, slot_lr=0.1)
    model = randomize(tg.GPT(cfg), seed=11, std=0.1)
    with torch.no_grad():
        model.tok_emb.weight.mul_(4.0)  # peaked predictions, so a leak of the label would show
    tokens = np.random.default_rng(0).integers(0, V, 257).astype(np.uint16)
    ends = tg.window_ends(256, 32, 8)
    w = window_of(ends, T_C2 - 1)
    assert ends[w - 1] < T_C2 - 1 < ends[w] - 1 and w % 4 != 0 and (T_C2 - 1) // 64 == 2
    return SimpleNamespace(cfg=cfg, model=model, tokens=tokens, run=run)


def c2_probs(s, mode, cfg=None):
    probs = []
    for v in range(V):
        toks = s.tokens.copy()
        toks[T_C2] = v
        _, nll = run_mode(mode, s.model, cfg or s.cfg, toks, s.run / f"{mode}.npy")
        probs.append(math.exp(-nll[T_C2 - 1]))
    return np.array(probs)


@pytest.mark.parametrize("mode", ["sliding", "ttt", "ttt_muon", "slot_causal"])
def test_legal_modes_score_a_normalized_distribution(small_vocab, mode):
    cfg = copy.deepcopy(small_vocab.cfg)
    if mode == "ttt_muon":
        cfg.ttt_optimizer = "muon"
    p = c2_probs(small_vocab, mode.removesuffix("_muon"), cfg)
    assert abs(p.sum() - 1.0) < 1e-4, p.sum()
    assert p.max() > 3.0 / V  # not a flat distribution


def test_reference_slot_is_not_a_distribution(small_vocab):
    p = c2_probs(small_vocab, "slot_reference")
    assert p.sum() > 1.0 + 1e-3, p.sum()  # each candidate label pulls probability towards itself


# ---------------------------------------------------------------------------------------------------
# SLOT against an autograd reference, side effects, and the whole final_eval pipeline
# ---------------------------------------------------------------------------------------------------


def slot_by_autograd(model, tokens, cfg, shared):
    """Spec SLOT, written plainly: per batch of windows, a hidden offset fitted by torch AdamW (betas 0.9/0.999,
    eps 1e-5, wd 1e-8, cosine lr) on the context positions (causal: one delta per window) or on the scored
    positions (reference: one delta per batch); then the scored targets are scored with it."""
    model = copy.deepcopy(model).eval().requires_grad_(False)
    tokens = np.asarray(tokens, dtype=np.uint16)
    ends = tg.window_ends(len(tokens) - 1, cfg.eval_seq_len, cfg.eval_stride)
    val, out = SimpleNamespace(tokens=tokens), []
    for b in range(0, len(ends), cfg.eval_batch_seqs):
        ks = np.arange(b, min(b + cfg.eval_batch_seqs, len(ends)))
        x, y, scored = tg.window_batch(val, ends, ks, dist1())
        with torch.no_grad():
            h = model.hidden(x).float()
        fit = (scored if shared else ~scored).float()
        w = fit / fit.sum().clamp_min(1) if shared else fit / fit.sum(1, keepdim=True).clamp_min(1)
        delta = torch.zeros(1 if shared else len(ks), 1, h.size(-1), requires_grad=True)
        opt = torch.optim.AdamW([delta], lr=cfg.slot_lr, betas=(0.9, 0.999), eps=1e-5, weight_decay=1e-8)
        for k in range(cfg.slot_steps):
            opt.param_groups[0]["lr"] = cfg.slot_lr_min + 0.5 * (cfg.slot_lr - cfg.slot_lr_min) * (
                1 + math.cos(math.pi * k / cfg.slot_steps))
            logits = model.logits(h + delta)
            ce = F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), reduction="none").view(y.shape)
            opt.zero_grad()
            (ce * w).sum().backward()
            opt.step()
        with torch.no_grad():
            logits = model.logits(h + delta)
            nll = F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), reduction="none").view(y.shape)
        out.append(nll[scored].double().numpy())
    return np.concatenate(out)


@pytest.mark.parametrize("mode", ["slot_causal", "slot_reference"])
def test_slot_matches_an_autograd_reference(tmp_path, trained_model, mode):
    cfg = smoke_cfg(tmp_path, eval_seq_len=64, eval_stride=16, eval_batch_seqs=5, slot_steps=4, slot_lr=0.1)
    tokens = val_tokens(700)  # 41 windows: the last batch is a partial one
    _, nll = run_mode(mode, trained_model, cfg, tokens, tmp_path / "nll.npy")
    ref = slot_by_autograd(trained_model, tokens, cfg, shared=mode == "slot_reference")
    np.testing.assert_allclose(nll, ref, rtol=0, atol=2e-4)
    _, plain = run_mode("sliding", trained_model, cfg, tokens, tmp_path / "plain.npy")
    assert np.abs(ref - plain).max() > 1e-2  # SLOT does something


@pytest.mark.parametrize("slot", ["off", "causal", "reference"])
def test_evaluate_has_no_side_effects_on_the_model(tmp_path, trained_model, slot):
    cfg = smoke_cfg(tmp_path, eval_seq_len=64, eval_stride=32, slot_steps=2)
    before = {k: v.clone() for k, v in trained_model.state_dict().items()}
    trained_model.train()
    tg.evaluate(trained_model, tg.ValData(cfg, tokens=val_tokens(400)), cfg, dist1(), 32, name="sliding",
                slot=slot, log=quiet_log())
    assert trained_model.training  # mode restored
    assert all(p.grad is None for p in trained_model.parameters())  # nothing for a later TTT to pick up
    assert all(torch.equal(v, before[k]) for k, v in trained_model.state_dict().items())


def test_evaluate_named_without_log(tmp_path, trained_model):
    """log is optional (regression: a named evaluate() without a log crashed in reduce_score)."""
    cfg = smoke_cfg(tmp_path, eval_seq_len=64, eval_stride=32)
    r = tg.evaluate(trained_model, tg.ValData(cfg, tokens=val_tokens(200)), cfg, dist1(), 32, name="sliding")
    assert r["targets"] == 199


def _val_dir(path, tokens):
    write_shard(path / "fineweb_val_000000.bin", tokens)
    return path


PIPE_T = 1490  # inside TTT chunk 2 of 6: the adapted weights depend on it from chunk 3 on


@pytest.fixture(scope="module")
def pipeline_runs(trained, tmp_path_factory):
    """final_eval (roundtrip, sliding, TTT, causal SLOT on the same model object, as main runs them) on the val
    stream and on a copy with token PIPE_T changed; every mode's per-target NLLs are captured."""
    run = tmp_path_factory.mktemp("pipeline")
    tokens = val_tokens(3001)
    flags = dict(eval_seq_len=L, eval_stride=STRIDE, eval_batch_seqs=BATCH, slot="causal", slot_steps=3, ttt=1,
                 ttt_chunk_tokens=CHUNK, ttt_epochs=1, ttt_lr=0.05)
    out = {}
    for name, toks in (("a", tokens), ("b", perturb(tokens, PIPE_T, 1024))):
        real = tg.evaluate

        def capture(*args, **kw):  # give every named evaluate() call its own save_nll file
            mode = args[5] if len(args) > 5 else kw.get("name", "")
            if mode:
                kw["save_nll"] = str(run / f"{name}_{mode}.npy")
            return real(*args, **kw)
        cfg = smoke_cfg(run / f"run_{name}", data_path=str(_val_dir(run / f"data_{name}", toks)), **flags)
        model = copy.deepcopy(trained["model"])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tg, "evaluate", capture)
            ev = tg.final_eval(model, cfg, dist1(), quiet_log(), str(run / f"{name}_ttt.npy"))
        out[name] = {"ev": ev, "nll": {m: np.load(run / f"{name}_{m}.npy") for m in ev["modes"]}}
    return out


def test_final_eval_runs_every_mode(pipeline_runs):
    ev = pipeline_runs["a"]["ev"]
    assert set(ev["modes"]) == {"roundtrip", "sliding", "slot_causal", "ttt"} and ev["primary"] == "ttt"
    assert all(r["targets"] == 3000 and r["legal"] for r in ev["modes"].values())
    for m, nll in pipeline_runs["a"]["nll"].items():
        assert len(nll) == 3000 and nll.mean() == pytest.approx(ev["modes"][m]["val_loss"], rel=1e-12), m


@pytest.mark.parametrize("mode", ["roundtrip", "sliding", "ttt", "slot_causal"])
def test_final_eval_pipeline_is_legal(pipeline_runs, mode):
    """Nothing one mode leaves behind (gradients, adapted weights) may carry future tokens into another's scores."""
    a, b, t = pipeline_runs["a"]["nll"][mode], pipeline_runs["b"]["nll"][mode], PIPE_T
    assert np.array_equal(a[:t - 1], b[:t - 1]), (mode, np.abs(a[:t - 1] - b[:t - 1]).max())
    assert a[t - 1] != b[t - 1]


def test_eval_ttt_leaves_the_callers_model_alone(tmp_path, trained_model):
    cfg = smoke_cfg(tmp_path, eval_seq_len=64, eval_stride=32, ttt_chunk_tokens=128, ttt_lr=0.05)
    before = {k: v.clone() for k, v in trained_model.state_dict().items()}
    tg.eval_ttt(trained_model, tg.ValData(cfg, tokens=val_tokens(600)), cfg, dist1(), quiet_log(),
                deadline=time.perf_counter() + 600)
    assert all(torch.equal(v, before[k]) for k, v in trained_model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in trained_model.parameters())


def test_slot_stops_adapting_at_the_deadline(tmp_path, trained_model):
    """Past the budget SLOT keeps scoring (C4) but without adapting: those windows score as plain sliding."""
    cfg = smoke_cfg(tmp_path, eval_seq_len=64, eval_stride=16, eval_batch_seqs=4, slot_steps=3)
    tokens = val_tokens(800)
    val = tg.ValData(cfg, tokens=tokens)
    log = quiet_log(tmp_path / "log")
    r = tg.evaluate(trained_model, val, cfg, dist1(), 16, name="slot_causal", slot="causal", log=log,
                    save_nll=str(tmp_path / "late.npy"), deadline=time.perf_counter() - 1)
    assert r["targets"] == val.n
    assert "SLOT stops adapting at window 4/" in (tmp_path / "log").read_text()
    _, plain = run_mode("sliding", trained_model, cfg, tokens, tmp_path / "plain.npy")
    _, slot = run_mode("slot_causal", trained_model, cfg, tokens, tmp_path / "slot.npy")
    late, ends = np.load(tmp_path / "late.npy"), tg.window_ends(val.n, 64, 16)
    first_batch = int(ends[3])  # targets of windows 0..3, the batch that adapted
    np.testing.assert_allclose(late[:first_batch], slot[:first_batch], rtol=0, atol=1e-6)
    np.testing.assert_allclose(late[first_batch:], plain[first_batch:], rtol=0, atol=1e-6)
    assert np.abs(slot[first_batch:] - plain[first_batch:]).max() > 1e-3


@pytest.mark.parametrize("slot,ttt,primary,legal", [
    ("reference", 0, "sliding", False), ("causal", 0, "slot_causal", True), ("causal", 1, "ttt", True),
    ("off", 1, "ttt", True), ("off", 0, "sliding", True)])
def test_submission_score_mode_and_legality(tmp_path, trained_model, slot, ttt, primary, legal):
    data = _val_dir(tmp_path / "data", val_tokens(1025))
    cfg = smoke_cfg(tmp_path / "run", data_path=str(data), eval_seq_len=64, eval_stride=32, slot=slot, slot_steps=2,
                    ttt=ttt, ttt_chunk_tokens=256)
    d = dist1()
    ev = tg.final_eval(trained_model, cfg, d, quiet_log(), None)
    assert ev["primary"] == primary
    art = {"bytes_total": 3, "bytes_code": 1, "bytes_model": 2}
    tg.write_submission(cfg, d, ev, art, {"steps": 12, "train_time": 1.0}, quiet_log())
    sub = json.loads((tmp_path / "run" / "submission.json").read_text())
    assert sub["score_mode"] == primary and sub["record_legal"] is legal
    assert sub["val_bpb"] == ev["modes"][primary]["val_bpb"]
    assert ("compliance_note" in sub) is (not legal)
    if slot == "reference":
        assert sub["eval_modes"]["slot_reference"]["record_legal"] is False
