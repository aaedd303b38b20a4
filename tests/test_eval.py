"""Evaluation section: exact val_bpb, window coverage, --save-nll, and the legality conditions of every
eval mode (rules §1.4): C1/C3 (a target's score never depends on tokens after it), C2 (scores are a
normalized distribution over the vocabulary), C4 (every target scored exactly once).

Legality is tested by perturbation: change the token at position t and compare the per-target NLL arrays
written by save_nll. Target j predicts token j+1 from tokens <= j, so targets j < t-1 must not move."""
import copy
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import TOKENIZER, dist1, quiet_log, randomize, smoke_cfg, tg, val_tokens

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
