"""Score tooling (bench/paired_test.py, bench/score_ab.py, bench/quant_probe.py, bench/gptq_probe.py): the
significance tests, the A/B table, the post-training quantization probe, the GPTQ export probe."""
import math
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TOKENIZER, smoke_cfg, tg

sys.path.insert(0, str(ROOT / "bench"))
import gptq_probe  # noqa: E402
import paired_test as pt  # noqa: E402
import quant_probe  # noqa: E402
import score_ab  # noqa: E402


def test_student_t_tail_matches_known_values():
    assert pt.t_sf(1.0, 1) == pytest.approx(0.25, abs=1e-12)  # Cauchy
    assert pt.t_sf(2.776445, 4) == pytest.approx(0.025, abs=1e-6)  # t table, 4 dof
    assert pt.t_sf(1.959964, 1e7) == pytest.approx(0.025, abs=1e-5)  # the normal limit
    assert pt.t_sf(-2.776445, 4) == pytest.approx(0.975, abs=1e-6)
    assert pt.t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-5)


def test_welch_one_sided():
    r = pt.welch_one_sided([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])  # t = -1/sqrt(2/3), 4 dof
    assert r["t"] == pytest.approx(-1 / math.sqrt(2 / 3)) and r["dof"] == pytest.approx(4.0)
    assert r["p_one_sided"] == pytest.approx(1 - pt.t_sf(-1 / math.sqrt(2 / 3), 4)) and 0.14 < r["p_one_sided"] < 0.15
    assert pt.welch_one_sided([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])["p_one_sided"] > 0.5


def _stream(doc_lens):
    toks = np.concatenate([np.r_[1, np.full(n - 1, 100)] for n in doc_lens])
    return toks, len(toks) - 1


def test_units_are_documents_or_blocks():
    toks, n = _stream([3, 4, 2])
    assert pt.unit_ids(toks, n, "doc", 0).tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    assert pt.unit_ids(toks, n, "block", 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


def test_paired_test_pairs_units_not_targets():
    """Two long documents that move in opposite directions: the bpb difference is exact, and the interval
    (by document) must admit zero, though per target the shift looks overwhelming."""
    toks, n = _stream([501, 501])
    units = pt.unit_ids(toks, n, "doc", 0)
    rng = np.random.default_rng(0)
    a = rng.uniform(1, 2, n)
    b = a - np.where(units == 0, 0.3, -0.2)  # doc 0: A worse; doc 1: A better
    nbytes = np.full(n, 2)
    r = pt.paired(a, b, nbytes, units)
    assert r["delta"] == pytest.approx((a.sum() - b.sum()) / (math.log(2) * nbytes.sum()))
    assert r["bpb_a"] - r["bpb_b"] == pytest.approx(r["delta"])
    assert r["ci95"][0] < 0 < r["ci95"][1] and r["p_two_sided"] > 0.2 and r["units"] == 2
    worse = a - 0.01 + rng.normal(0, 0.01, n)  # A worse by 0.01 nats a target, throughout
    many = pt.paired(a, worse, nbytes, pt.unit_ids(toks, n, "block", 10))
    assert many["units"] == 101 and many["ci95"][0] > 0 and many["p_two_sided"] < 1e-6
    toks, n = _stream([501, 500])  # 500 targets each (a document's BOS is the previous one's last target)
    whole = np.arange(n, dtype=np.float64)  # exact sums: both documents move by exactly 500 nats
    assert pt.paired(whole, whole - 1, np.full(n, 2), pt.unit_ids(toks, n, "doc", 0))["p_two_sided"] == 0.0
    with pytest.raises(ValueError):
        pt.paired(a, b[:-1], nbytes, units)


@pytest.mark.parametrize("text", ["x", "=A=1", "a b=A=1", "a=lower=1", "a=A"])
def test_bad_arms_are_refused(text):
    with pytest.raises(ValueError):
        score_ab.parse_arm(text)


def test_arms_parse():
    assert score_ab.parse_arm("up16=MLP_UP_ALPHABET=16,WARMUP_BY_CLOCK=1") == (
        "up16", None, {"MLP_UP_ALPHABET": "16", "WARMUP_BY_CLOCK": "1"})
    assert score_ab.parse_arm("base=") == ("base", None, {})
    assert score_ab.parse_arm("c@base=EVAL_SEQ_LEN=2048", eval_arm=True) == ("c", "base", {"EVAL_SEQ_LEN": "2048"})
    with pytest.raises(ValueError):
        score_ab.parse_arm("c=EVAL_SEQ_LEN=2048", eval_arm=True)


def _fake_run(d, sliding, ttt, log="train.log", steps=100):
    d.mkdir(parents=True)
    (d / log).write_text(f"stopped step:{steps}/9000 train_time:1ms\nsize: code:1 + model:2 = total:3 cap:16000000 UNDER\n"
                         f"final_sliding val_loss:2.0 val_bpb:{sliding}\nfinal_ttt val_loss:1.9 val_bpb:{ttt}\n")


def test_table_orders_arms_and_reports_deltas(tmp_path):
    (tmp_path / "arms.txt").write_text("zeta alpha\n")
    for seed, (z, a) in {1: (1.60, 1.58), 2: (1.62, 1.59)}.items():
        _fake_run(tmp_path / f"zeta_s{seed}", z + 0.03, z)
        _fake_run(tmp_path / f"alpha_s{seed}", a + 0.03, a, log="eval.log")
    r = score_ab.load_run(tmp_path / "alpha_s1")
    assert (r["score"], r["sliding"], r["bytes"], r["steps"]) == (1.58, 1.61, 3, 100)
    out = score_ab.table([tmp_path], None, None)
    rows = [line.split() for line in out.splitlines()]
    assert rows[1][0] == "zeta" and [r for r in rows if r[:2] == ["alpha", "1"]][0][-1] == "-0.02000"
    summary = [r for r in rows if r[:2] == ["alpha", "2"]][-1]  # the summary: arm, n, mean, sd, d_mean, p
    assert float(summary[4]) == pytest.approx(-0.025) and float(summary[5]) < 0.1


def test_score_ab_skips_runs_already_done(tmp_path, monkeypatch, capsys):
    """train_gpt.py refuses a run folder that holds a run: a second call of the same plan skips the finished runs
    instead of launching runs that would be refused."""
    _fake_run(tmp_path / "a_s1", 1.63, 1.60)
    monkeypatch.setenv("DATA_PATH", str(ROOT / "data" / "datasets" / "fineweb_tiny_sp1024"))
    monkeypatch.setenv("TOKENIZER_PATH", str(ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"))
    monkeypatch.setattr(score_ab, "run_one", lambda *a: pytest.fail(f"launched {a}"))
    score_ab.main(["--out", str(tmp_path), "--arm", "a=", "--seeds", "1"])
    out = capsys.readouterr().out
    assert "skipped (budget, missing input or already run): a_s1 (already run)" in out and "1.60000" in out


@pytest.mark.parametrize("rc", [0, 1])
def test_score_ab_slim_keeps_a_finished_runs_results_only(tmp_path, monkeypatch, capsys, rc):
    """A GPU call's output folder comes back only with few files: --slim drops model.pt, checkpoints and the
    stdout copy of a finished run, and keeps everything of a failed one (its traceback is in train.out)."""
    def fake_run_one(cmd, env, run_dir, log_name):
        _fake_run(run_dir, 1.61, 1.60)
        for f in ("model.pt", "ckpt_step000010.pt", "train.out", "model.hqa", "nll.npy", "submission.json"):
            (run_dir / f).write_text("x")
        return rc, 1.0
    monkeypatch.setenv("DATA_PATH", str(ROOT / "data" / "datasets" / "fineweb_tiny_sp1024"))
    monkeypatch.setenv("TOKENIZER_PATH", str(ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"))
    monkeypatch.setattr(score_ab, "run_one", fake_run_one)
    score_ab.main(["--out", str(tmp_path), "--arm", "a=", "--seeds", "1", "--slim"])
    kept = sorted(p.name for p in (tmp_path / "a_s1").iterdir())
    assert kept == (["model.hqa", "nll.npy", "submission.json", "train.log"] if rc == 0 else
                    ["ckpt_step000010.pt", "model.hqa", "model.pt", "nll.npy", "submission.json", "train.log", "train.out"])


@pytest.mark.parametrize("bits", [8, 6])
def test_quant_probe_requantizes_only_the_named_tables_and_counts_their_bytes(tmp_path, bits):
    model = tg.GPT(smoke_cfg(tmp_path))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sizes = quant_probe.requantize(model, ["tok_emb.weight", "bigram_embed.weight"], bits)
    for n, p in model.named_parameters():
        if n in sizes:  # on the per-row grid: within a step (the top level is clamped; the scale is fp16)
            step = before[n].abs().amax(1, keepdim=True) / 2 ** (bits - 1)
            err = (p - before[n]).abs()
            assert not torch.equal(p, before[n]) and (err <= 1.1 * step).all() and err.mean() < step.mean() / 3
        else:
            assert torch.equal(p, before[n]), n
    rows, cols = model.tok_emb.weight.shape
    fp16, est = sizes["tok_emb.weight"]
    assert fp16 == 2 * rows * cols and 2 * rows < est < (bits / 8) * rows * cols + 2 * rows + 1
    with pytest.raises(SystemExit, match="not a 2-D tensor"):
        quant_probe.requantize(model, ["smear_gate"], bits)


def test_gptq_probe_scores_float_round_and_gptq_on_the_smoke_run(trained, small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATA_PATH", str(small_data))
    monkeypatch.setenv("TOKENIZER_PATH", str(TOKENIZER))
    gptq_probe.main([str(trained["run"] / "model.pt"), "--calib-seqs", "8", "--targets", "2048", "--device", "cpu",
                     "--unit", "block", "--block", "256", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "gptq: calib_seqs:8 tokens:1024 hessian:" in out
    bpb = {ln.split(":")[0]: float(ln.split("bpb ")[1].split(",")[0]) for ln in out.splitlines()
           if ln.split(":")[0] in ("float", "round", "gptq") and " targets, bpb " in ln}
    assert set(bpb) == {"float", "round", "gptq"} and all(2 < v < 12 for v in bpb.values())
    assert "bytes: rANS stream round " in out and "bytes: pent mlp-up " in out
    nll = {k: np.load(tmp_path / f"{k}.npy") for k in bpb}
    assert all(len(v) == 2048 for v in nll.values()) and not np.array_equal(nll["gptq"], nll["round"])
    cfg = tg.Config(data_path=str(small_data), tokenizer_path=str(TOKENIZER))
    val = tg.ValData(cfg, tokens=tg.load_val_tokens(cfg)[:2049])
    r = pt.paired(nll["gptq"], nll["round"], val.bytes, pt.unit_ids(val.tokens, val.n, "block", 256))
    assert pt.report(r, "gptq", "round") in out and r["units"] == 8  # the paired test on the dumps it wrote
    monkeypatch.delenv("DATA_PATH")
    with pytest.raises(SystemExit, match="error: set DATA_PATH"):
        gptq_probe.main([str(trained["run"] / "model.pt")])
