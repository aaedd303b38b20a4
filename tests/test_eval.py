"""Evaluation section: exact val_bpb, window coverage, --save-nll, and the legality conditions of every
eval mode (rules §1.4): C1/C3 (a target's score never depends on tokens after it), C2 (scores are a
normalized distribution over the vocabulary), C4 (every target scored exactly once).

Legality is tested by perturbation: change the token at position t and compare the per-target NLL arrays
written by save_nll. Target j predicts token j+1 from tokens <= j, so targets j < t-1 must not move."""
import copy
import inspect
import json
import math
import textwrap
import time
import types
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


def test_cli_eval_only_uses_the_artifacts_eval_settings(tmp_path, trained, small_data):
    """The artifact records its run's eval settings: --eval-only without flags scores as that run did (not as
    the preset says), a flag overrides one setting, and the log names what was overridden."""
    cfg = copy.deepcopy(trained["cfg"])
    cfg.run_dir, cfg.eval_seq_len, cfg.eval_stride, cfg.ttt, cfg.slot = str(tmp_path / "art"), 64, 32, 0, "off"
    path, _ = tg.write_artifact(trained["model"], cfg, dist1(), quiet_log())
    base = ["--preset", "smoke", "--eval-only", path, "--data-path", str(small_data), "--tokenizer-path", str(TOKENIZER)]
    logs = {}
    for name, flags in (("run", ["--eval-seq-len", "64", "--eval-stride", "32", "--ttt", "0", "--slot", "off"]),
                        ("bare", []), ("stride", ["--eval-stride", "16"])):
        tg.main([*base, *flags, "--run-dir", str(tmp_path / name)])
        logs[name] = (tmp_path / name / "eval.log").read_text()

    def sliding(text):
        return text.split("final_sliding val_loss:")[1].split()[0]
    assert "eval_settings: the artifact's overridden:none" in logs["bare"] and "final_ttt" not in logs["bare"]
    assert sliding(logs["bare"]) == sliding(logs["run"])  # the smoke preset alone would run TTT and SLOT at 128
    assert "eval_settings: the artifact's overridden:EVAL_STRIDE=16(artifact:32)" in logs["stride"]
    assert sliding(logs["stride"]) != sliding(logs["run"])


def test_cli_eval_only_checks_its_inputs_before_the_run_folder(tmp_path, trained, small_data, capsys):
    """A bad artifact, tokenizer or val folder is refused (one error line, exit 2) before eval.log exists, so the
    corrected retry into the same folder is not refused as a folder that holds an evaluation."""
    cfg = copy.deepcopy(trained["cfg"])
    cfg.run_dir = str(tmp_path / "art")
    path, _ = tg.write_artifact(trained["model"], cfg, dist1(), quiet_log())
    bad = tmp_path / "x.hqa"
    bad.write_bytes(b"garbage")
    out = tmp_path / "ev"
    base = ["--preset", "smoke", "--run-dir", str(out), "--ttt", "0", "--slot", "off"]
    good = {"--eval-only": path, "--data-path": str(small_data), "--tokenizer-path": str(TOKENIZER)}
    for flag, value, words in (("--eval-only", str(bad), str(bad)), ("--tokenizer-path", str(tmp_path / "no.model"),
                               "TOKENIZER_PATH"), ("--data-path", str(tmp_path), "no val shards")):
        with pytest.raises(SystemExit) as e:
            tg.main(base + [x for k, v in (good | {flag: value}).items() for x in (k, v)])
        assert e.value.code == 2 and words in capsys.readouterr().err
        assert not (out / "eval.log").exists()
    tg.main(base + [x for kv in good.items() for x in kv])
    assert "final_sliding" in (out / "eval.log").read_text()


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
# legality at the boundaries: one-token leaks where a TTT chunk or a window's scored slice begins
#
# The probes above sit mid-chunk and mid-window. A TTT that also trains on the next chunk's first target,
# or a causal SLOT whose fit includes the first scored position, moves no earlier target (the perturbation
# tests pass) and leaves mid-chunk/mid-window scores normalized (the C2 probes above pass). Two checks see
# them: C2 probes exactly at those first targets, and an oracle of which targets each TTT update trains on.
# Each check is also run against a planted leak (the tests named test_planted_*) to show that it fails.
# The same leaks by hand, on a scratch copy of the repository (train_gpt.py in place is never touched):
#   cp -r . /tmp/leak && cd /tmp/leak
#   (a) sed -i 's/^        a, b = sc.target_range(int(ks\[0\]), int(ks\[-1\]) + 1)$/&; b += 1/' train_gpt.py
#   (b) sed -i 's/self.model, h, y, ~scored, self.cfg/self.model, h, y, ~scored | torch.roll(~scored, 1, 1), self.cfg/' train_gpt.py
#   python -m pytest -q tests/test_eval.py
# (a) fails test_edge_targets_score_a_normalized_distribution[ttt, ttt_muon] (sum of p at target 128: 1.031,
#     1.116) and test_ttt_oracle_trains_only_on_scored_targets[*] (update 0 trains on target 108, unscored);
# (b) fails test_edge_targets_score_a_normalized_distribution[slot_causal] (1.185) and, as a mismatch rather than
#     a legality failure, test_slot_matches_an_autograd_reference[slot_causal]. All other tests pass on both.
# ---------------------------------------------------------------------------------------------------

EDGE_CHUNK_FIRST = 128  # target: first of TTT chunk 2 (of 4) in the small_vocab setup, and window 13's first


def edge_modes():
    """Every record-legal mode (LEGAL), each as (runner name, config changes, stride of its windows)."""
    return {"raw": ("raw", {}, "L"), "roundtrip": ("roundtrip", {}, "L"), "sliding": ("sliding", {}, "stride"),
            "ttt": ("ttt", {"ttt_optimizer": "sgd"}, "stride"),
            "ttt_muon": ("ttt", {"ttt_optimizer": "muon"}, "stride"),
            "slot_causal": ("slot_causal", {}, "stride")}


def test_edge_probes_cover_every_legal_mode():
    """A mode added to LEGAL must get its boundary probe: extend edge_modes() and run_edge()."""
    legal = {m for m, ok in tg.LEGAL.items() if ok}
    assert legal <= {name for name, _, _ in edge_modes().values()}, legal


def run_edge(mode, model, cfg, tokens):
    """Per-target NLL of one full eval of `tokens` in `mode` (a key of edge_modes())."""
    name, changes, stride = edge_modes()[mode]
    cfg = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(cfg, k, v)
    val = tg.ValData(cfg, tokens=np.asarray(tokens, dtype=np.uint16))
    m, d, path = copy.deepcopy(model), dist1(), str(cfg.run_dir) + f"/edge_{mode}.npy"
    if name == "ttt":
        tg.eval_ttt(m, val, cfg, d, quiet_log(), deadline=time.perf_counter() + 600, save_nll=path)
    else:
        tg.evaluate(m, val, cfg, d, cfg.eval_seq_len if stride == "L" else cfg.eval_stride, name=name,
                    slot="causal" if name == "slot_causal" else "off", log=quiet_log(), save_nll=path)
    nll = np.load(path)
    assert len(nll) == val.n  # C4
    return nll


def edge_targets(mode, cfg):
    """{where: target}: TTT chunk 2's first target, and the first scored target of the next window after it."""
    _, _, stride = edge_modes()[mode]
    ends = tg.window_ends(256, cfg.eval_seq_len, cfg.eval_seq_len if stride == "L" else cfg.eval_stride)
    starts = np.concatenate(([0], ends[:-1]))
    assert EDGE_CHUNK_FIRST in starts and EDGE_CHUNK_FIRST == 2 * cfg.ttt_chunk_tokens
    return {"chunk_first": EDGE_CHUNK_FIRST, "window_first": int(starts[starts > EDGE_CHUNK_FIRST][0])}


def c2_sum_at(s, mode, target, cfg=None):
    """sum over v of p(target = v): token target+1 set to every id in turn, each a full eval of the mode."""
    cfg = cfg or s.cfg
    total = 0.0
    for v in range(V):
        toks = s.tokens.copy()
        toks[target + 1] = v
        total += math.exp(-run_edge(mode, s.model, cfg, toks)[target])
    return total


def check_c2_edges(s, mode, cfg=None):
    for where, t in edge_targets(mode, cfg or s.cfg).items():
        p = c2_sum_at(s, mode, t, cfg)
        assert abs(p - 1.0) < 1e-4, (mode, where, t, p)


@pytest.mark.parametrize("mode", list(edge_modes()))
def test_edge_targets_score_a_normalized_distribution(small_vocab, mode):
    check_c2_edges(small_vocab, mode)


def ttt_with_lookahead():
    """Planted leak (a): eval_ttt whose training range runs one target into the next chunk (the reference's
    look-ahead) -- a copy of the real function with that one line changed."""
    src = textwrap.dedent(inspect.getsource(tg.eval_ttt))
    line = "a, b = sc.target_range(int(ks[0]), int(ks[-1]) + 1)"
    assert src.count(line) == 1, "eval_ttt changed: re-plant the look-ahead leak on its training range"
    ns = {}
    exec(compile(src.replace(line, line + "; b += 1"), tg.__file__, "exec"), vars(tg).copy(), ns)
    f = ns["eval_ttt"]
    return types.FunctionType(f.__code__, vars(tg), f.__name__, f.__defaults__)  # tg's globals: patches apply


def slot_fit_with_first_scored(real):
    """Planted leak (b): causal SLOT whose fit mask also holds each window's first scored position."""
    def fit_slot_delta(step_fn, model, h, y, fit, cfg, shared):
        if not shared:
            fit = fit.clone()
            n_ctx = fit.sum(1)  # the context is the prefix of the window; the first scored position follows it
            rows = torch.nonzero(n_ctx < fit.size(1)).flatten()
            fit[rows, n_ctx[rows]] = True
        return real(step_fn, model, h, y, fit, cfg, shared)
    return fit_slot_delta


@pytest.mark.parametrize("mode", ["ttt", "ttt_muon"])
def test_planted_ttt_lookahead_fails_the_edge_probe(small_vocab, monkeypatch, mode):
    monkeypatch.setattr(tg, "eval_ttt", ttt_with_lookahead())
    p = c2_sum_at(small_vocab, mode, EDGE_CHUNK_FIRST)
    assert abs(p - 1.0) > 1e-3, p  # test_edge_targets_score_a_normalized_distribution asserts < 1e-4 here


def test_planted_slot_first_position_fit_fails_the_edge_probe(small_vocab, monkeypatch):
    monkeypatch.setattr(tg, "fit_slot_delta", slot_fit_with_first_scored(tg.fit_slot_delta))
    t = edge_targets("slot_causal", small_vocab.cfg)["window_first"]
    p = c2_sum_at(small_vocab, "slot_causal", t)
    assert abs(p - 1.0) > 1e-3, p  # test_edge_targets_score_a_normalized_distribution asserts < 1e-4 here


# ---- the oracle: which targets each TTT update trains on, against what was already scored ----------

ORACLE_L, ORACLE_STRIDE, ORACLE_CHUNK = 48, 20, 100  # chunks end mid-sequence: training reaches back


class FakeRank(tg.Dist):
    """Rank r of a `world`-rank run, alone: collectives are identities. Weights differ from a real multi-rank
    run; which targets are scored and trained when does not depend on them."""

    def all_reduce(self, t, op=None):
        return t


def locate(tokens, x, y):
    """Target positions of one training row: x = tokens[o:o+L], y = tokens[o+1:o+L+1] -> o..o+L-1 (unique)."""
    win = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.int64), len(x) + 1)
    hit = np.flatnonzero((win[:, :-1] == x).all(1) & (win[:, 1:] == y).all(1))
    assert len(hit) == 1, f"training row found {len(hit)} times in the stream"
    return np.arange(hit[0], hit[0] + len(x))


def record_ttt(monkeypatch, eval_ttt, model, cfg, tokens, rank=0, world=1):
    """Run eval_ttt with its scoring, training forwards and updates recorded, in order:
    ("score", first, end) per Scorer.score call; ("train", target positions) per training forward; ("update",)."""
    events, val = [], tg.ValData(cfg, tokens=tokens)
    real_score, real_nll, real_update = tg.Scorer.score, tg.nll_per_token, tg.ttt_update

    def score(self, k_lo, k_hi, progress=None):
        out = real_score(self, k_lo, k_hi, progress)
        ends = tg.window_ends(val.n, cfg.eval_seq_len, cfg.eval_stride)
        assert np.array_equal(self.ends, ends)
        a, b = (int(ends[k_lo - 1]) if k_lo else 0), int(ends[k_hi - 1])
        assert len(out) == b - a
        events.append(("score", a, b))
        return out

    def nll_per_token(model_, ids, targets, delta=None):
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            pos = [locate(tokens, x, y) for x, y in zip(ids.cpu().numpy(), targets.cpu().numpy())]
            events.append(("train", np.concatenate(pos)))
        return real_nll(model_, ids, targets, delta)

    def ttt_update(*args, **kw):
        events.append(("update",))
        return real_update(*args, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(tg.Scorer, "score", score)
        mp.setattr(tg, "nll_per_token", nll_per_token)
        mp.setattr(tg, "ttt_update", ttt_update)
        mp.setattr(tg, "reduce_score", lambda *a, **k: {})  # world > 1 would gather over a process group
        eval_ttt(copy.deepcopy(model), val, cfg, FakeRank(rank, world, dist1().device), quiet_log(),
                 deadline=time.perf_counter() + 600)
    return events


def expected_chunks(n, cfg):
    """Target ranges of the TTT chunks, from the chunk size and the window ends alone: a window belongs to the
    chunk of its first scored target, so chunk c runs from the first window start >= c*C to the next one."""
    ends = tg.window_ends(n, cfg.eval_seq_len, cfg.eval_stride)
    starts = np.concatenate(([0], ends[:-1]))
    firsts = sorted({int(starts[starts >= c * cfg.ttt_chunk_tokens][0])
                     for c in range(n // cfg.ttt_chunk_tokens + 1) if (starts >= c * cfg.ttt_chunk_tokens).any()})
    return list(zip(firsts, firsts[1:] + [n]))


def check_ttt_oracle(runs, n, cfg):
    """`runs`: the event lists of every rank. C3 first: no rank's update trains on a target that no rank had
    scored before it (ranks meet at every update: its gradient is all-reduced). Then the structure: the
    chunks are scored in order, each once across the ranks, and every update after chunk c's scoring trains
    on whole sequences of L targets tiled back from the chunk's end until they cover it (not before the
    stream's start), nothing later. Returns, per update, the chunk it trained on (None: no training)."""
    L, chunks = cfg.eval_seq_len, expected_chunks(n, cfg)
    per_rank = []
    for events in runs:  # each rank's events, split at its updates
        phases = [{"scored": [], "trained": []}]
        for e in events:
            if e[0] == "update":
                phases.append({"scored": [], "trained": []})
            elif e[0] == "score":
                phases[-1]["scored"].append(e[1:])
            else:
                phases[-1]["trained"].append(e[1])
        per_rank.append(phases)
    scored, next_chunk, trained_chunk = np.zeros(n, bool), 0, []
    for u in range(max(len(p) for p in per_rank)):
        now = [p[u] if u < len(p) else {"scored": [], "trained": []} for p in per_rank]
        got = sorted(r for ph in now for r in ph["scored"])
        for a, b in got:
            assert not scored[a:b].any(), f"targets in {a}..{b} scored twice"
            scored[a:b] = True
        for r, ph in enumerate(now):
            for pos in ph["trained"]:
                assert scored[pos].all(), (f"rank {r}, update {u}: TTT trained on targets "
                                           f"{np.unique(pos[~scored[pos]]).tolist()} before they were scored")
        if got:  # this phase scores the next chunk, all of it, across the ranks
            a, b = chunks[next_chunk]
            assert got[0][0] == a and got[-1][1] == b and all(x[1] == y[0] for x, y in zip(got, got[1:])), \
                (u, (a, b), got)
            next_chunk += 1
        parts = [pos for ph in now for pos in ph["trained"]]
        if not parts:
            trained_chunk.append(None)
            continue
        c = next_chunk - 1
        a, b = chunks[c]
        m = -(-(b - a) // L)
        while b - m * L < 0:
            m -= 1
        trained = np.unique(np.concatenate(parts))
        assert np.array_equal(trained, np.arange(b - m * L, b)), (u, c, (a, b), trained.min(), trained.max())
        assert sum(map(len, parts)) == m * L  # each sequence once per update, split over the ranks
        trained_chunk.append(c)
    assert next_chunk == len(chunks) and scored.all()  # C4, from the recorded score calls alone
    return trained_chunk[:-1]  # the phase after the last update has no update


@pytest.fixture(scope="module")
def oracle_setup(trained, tmp_path_factory):
    run = tmp_path_factory.mktemp("oracle")
    cfg = smoke_cfg(run, eval_seq_len=ORACLE_L, eval_stride=ORACLE_STRIDE, eval_batch_seqs=4,
                    ttt_chunk_tokens=ORACLE_CHUNK, ttt_epochs=2, ttt_lr=0.05)
    tokens = val_tokens(1001)  # real text: every training row of 48 tokens occurs once in the stream
    chunks = expected_chunks(1000, cfg)
    assert len(chunks) == 10 and any((b - a) % ORACLE_L for a, b in chunks)
    return SimpleNamespace(cfg=cfg, tokens=tokens, model=trained["model"], chunks=chunks)


@pytest.mark.parametrize("optimizer,world", [("sgd", 1), ("muon", 1), ("sgd", 2), ("sgd", 3)])
def test_ttt_oracle_trains_only_on_scored_targets(oracle_setup, monkeypatch, optimizer, world):
    s = oracle_setup
    cfg = copy.deepcopy(s.cfg)
    cfg.ttt_optimizer = optimizer
    runs = [record_ttt(monkeypatch, tg.eval_ttt, s.model, cfg, s.tokens, r, world) for r in range(world)]
    per_update = check_ttt_oracle(runs, 1000, cfg)
    assert per_update == [c for c in range(len(s.chunks) - 1) for _ in range(cfg.ttt_epochs)]  # not the last
    for events in runs:
        assert events[-1][0] == "score"  # nothing trains after the last chunk's scoring


def test_planted_ttt_lookahead_fails_the_oracle(oracle_setup, monkeypatch):
    s = oracle_setup
    runs = [record_ttt(monkeypatch, ttt_with_lookahead(), s.model, s.cfg, s.tokens)]
    with pytest.raises(AssertionError, match=rf"update 0: TTT trained on targets \[{s.chunks[1][0]}\b.* before"):
        check_ttt_oracle(runs, 1000, s.cfg)  # chunk 1's first target, at chunk 0's first update


def test_oracle_sees_training_before_scoring(oracle_setup, monkeypatch):
    """The other order (the chunk trained on, then scored) fails the oracle too, for the whole chunk."""
    s = oracle_setup
    ev = record_ttt(monkeypatch, tg.eval_ttt, s.model, s.cfg, s.tokens)
    i = next(k for k, e in enumerate(ev) if e[0] == "update")
    assert ev[0] == ("score", *s.chunks[0])
    with pytest.raises(AssertionError, match="before they were scored"):
        check_ttt_oracle([ev[1:i + 1] + ev[:1] + ev[i + 1:]], 1000, s.cfg)  # chunk 0's score after its update


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
    tg.write_submission(cfg, d, ev, art, {"steps": 12, "train_time": 1.0}, quiet_log(), "smoke")
    sub = json.loads((tmp_path / "run" / "submission.json").read_text())
    assert sub["score_mode"] == primary and sub["record_legal"] is legal
    # the fields that differ from the smoke preset, by which the run can be redone
    smoke = tg.PRESETS["smoke"]
    assert sub["preset"] == "smoke" and sub["overrides"]["ttt_chunk_tokens"] == 256 and "run_dir" not in sub["overrides"]
    assert all(smoke.get(k, getattr(tg.Config(), k)) != v for k, v in sub["overrides"].items())
    assert sub["val_bpb"] == ev["modes"][primary]["val_bpb"]
    assert ("compliance_note" in sub) is (not legal)
    if slot == "reference":
        assert sub["eval_modes"]["slot_reference"]["record_legal"] is False


def test_eval_budget_runs_the_score_first_and_skips_what_cannot_fit(tmp_path, trained_model):
    """The round trip times one forward of every target; the score's mode runs next whatever the budget (C4
    needs every target; TTT stops adapting at the deadline); another mode runs only if its estimate fits."""
    data = _val_dir(tmp_path / "data", val_tokens(1025))
    kw = dict(data_path=str(data), eval_seq_len=64, eval_stride=32, slot="causal", slot_steps=2, ttt=1,
              ttt_chunk_tokens=256)
    est = tg.eval_plan(smoke_cfg(tmp_path / "p", **kw), 1024, 1.0)  # 31 windows of 64 over 1024 targets
    assert est["sliding"] == pytest.approx(31 * 64 / 1024) and est["ttt"] == pytest.approx(est["sliding"] + 3)
    runs = {}
    for name, budget in (("tight", 1e-9), ("ample", 600.0)):
        cfg = smoke_cfg(tmp_path / name, eval_budget_s=budget, **kw)
        ev = tg.final_eval(trained_model, cfg, dist1(), quiet_log(tmp_path / f"{name}.log"), None)
        runs[name] = (ev, (tmp_path / f"{name}.log").read_text())
    ev, text = runs["tight"]
    assert list(ev["modes"]) == ["roundtrip", "ttt"] and ev["primary"] == "ttt"
    assert ev["modes"]["ttt"]["targets"] == 1024
    assert "eval_plan: budget:0s" in text and "ttt:~" in text and "(the score: ttt, always run)" in text
    assert "ttt: eval budget reached at chunk 1/4" in text
    assert "OVER skipped:sliding(" in text and ",slot_causal(" in text
    ev, text = runs["ample"]
    assert list(ev["modes"]) == ["roundtrip", "ttt", "sliding", "slot_causal"]
    assert "within skipped:none" in text and "eval budget reached" not in text
