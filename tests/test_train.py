"""Training section: learning on the bundled sample, input validation, exact resume, and a real
2-process torchrun (gloo) run that must match a single-process run with the same global batch."""
import copy
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import hq_optim
from conftest import (BAD_SHARDS, CPU, DATA, GOOD, LEAKY_ENV, ROOT, TOKENIZER, dist1, parse_steps, quiet_log, smoke_cfg, tg,
                      val_tokens, write_shard)

# ---------------------------------------------------------------------------------------------------
# learning
# ---------------------------------------------------------------------------------------------------


def test_smoke_steps_lower_the_loss(trained):
    losses = parse_steps(trained["log"])
    assert sorted(losses) == list(range(1, 13)) and trained["info"]["steps"] == 12
    assert all(math.isfinite(v) for v in losses.values())
    assert abs(losses[1] - math.log(1024)) < 0.1  # starts near uniform
    assert losses[12] < losses[1] - 0.5, losses


def test_trained_model_beats_init_on_held_out_val(trained):
    cfg, d = trained["cfg"], dist1()
    val = tg.ValData(cfg, tokens=val_tokens(4097))
    torch.manual_seed(cfg.seed)
    init = tg.evaluate(tg.GPT(cfg), val, cfg, d, stride=cfg.eval_seq_len)
    after = tg.evaluate(trained["model"], val, cfg, d, stride=cfg.eval_seq_len)
    assert abs(init["val_loss"] - math.log(1024)) < 0.05
    assert after["val_loss"] < init["val_loss"] - 0.5, (init, after)


def test_train_writes_model_pt_and_rotates_checkpoints(tmp_path):
    cfg = smoke_cfg(tmp_path, iterations=3, warmdown_iters=1, save_every=1)
    tg.train(cfg, dist1(), quiet_log())
    assert sorted(p.name for p in tmp_path.glob("ckpt_step*.pt")) == ["ckpt_step000002.pt", "ckpt_step000003.pt"]
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["config"]["run_dir"] == str(tmp_path) and saved["config"]["iterations"] == 3
    ck = torch.load(tmp_path / "ckpt_step000003.pt", weights_only=True)
    assert ck["step"] == 3 and ck["world"] == 1 and set(ck["model"]) == set(saved["model"])
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temp files


def test_recur_due_by_clock_or_by_iterations(tmp_path):
    cfg = smoke_cfg(tmp_path, recur_layers="1,2", recur_start=0.5)  # 30 iterations, no clock
    assert [tg.recur_due(cfg, s, 0.0) for s in (0, 14, 15, 29)] == [False, False, True, True]
    cfg = smoke_cfg(tmp_path, recur_layers="1,2", recur_start=0.25, max_wallclock_seconds=100.0)
    assert [tg.recur_due(cfg, 999, e) for e in (0.0, 24.9, 25.0)] == [False, False, True]


def test_compile_warmup_runs_both_recurrence_graphs_before_the_clock(tmp_path, monkeypatch):
    """torch.compile specializes on recurrence being on or off: the untimed warm-up must trace both, or the
    switch at RECUR_START would compile inside the timed run."""
    monkeypatch.setattr(tg.torch, "compile", lambda m, **kw: m)  # CPU: the same calls, uncompiled
    cfg = smoke_cfg(tmp_path, iterations=4, warmdown_iters=1, recur_layers="1,2", recur_start=0.5, compile=1,
                    compile_warmup_steps=2)
    seen = []
    real_init = tg.GPT.__init__

    def init(self, c):
        real_init(self, c)
        self.register_forward_pre_hook(lambda m, args: seen.append(m.recur_active))
    monkeypatch.setattr(tg.GPT, "__init__", init)
    tg.train(cfg, dist1(), quiet_log())
    per_step = [False, True] + [False, False, True, True]  # warm-up (restored after), then the timed steps
    assert seen == [on for on in per_step for _ in range(tg.TrainLoader(cfg, dist1()).accum)]  # a call per micro-batch


@pytest.mark.parametrize("start,on_step", [(0.5, 3), (1.0, None)])
def test_recurrence_turns_on_at_recur_start_and_the_artifact_runs_as_trained(tmp_path, start, on_step):
    cfg = smoke_cfg(tmp_path, iterations=6, warmdown_iters=2, recur_layers="1,2", recur_start=start, parallel_from=2)
    model, info = tg.train(cfg, dist1(), quiet_log(tmp_path / "t.log"))
    text = (tmp_path / "t.log").read_text()
    assert info["steps"] == 6 and all(math.isfinite(v) for v in parse_steps(text).values())
    assert ("recur: layers 1,2 run twice from step 3 " in text) == (on_step == 3) and text.count("recur:") <= 1
    assert model.recur_active == (on_step is not None)
    payload, _ = tg.build_artifact(model, cfg)
    mcfg, sd = tg.parse_artifact(payload, "a.hqa")
    assert mcfg.recur_layers == ("1,2" if on_step else "") and mcfg.parallel_from == 2
    loaded = tg.GPT(mcfg)
    loaded.load_state_dict(sd)
    loaded.set_quantized(False)
    ids = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(0))
    model.eval()
    assert loaded.recur_active == model.recur_active
    with torch.no_grad():  # equal up to the fp16 storage of the unquantized parameters
        assert (loaded.hidden(ids) - model.hidden(ids)).abs().max() < 0.01


def test_qat_0_trains_float_weights_and_the_export_quantizes_them(tmp_path):
    runs = {}
    for qat in (0, 1):
        cfg = smoke_cfg(tmp_path / str(qat), iterations=3, warmdown_iters=1, log_every=1, save_every=0, qat=qat)
        model, info = tg.train(cfg, dist1(), quiet_log(tmp_path / f"{qat}.log"))
        runs[qat] = model, parse_steps((tmp_path / f"{qat}.log").read_text()), info
    model, steps, info = runs[0]
    lins = [m for m in model.modules() if isinstance(m, tg.QATLinear)]
    assert lins and not any(m.quantized for m in lins) and info["gptq"] is None
    # same seed, data and schedule: step 1 still matches (the zero-initialized projections hide q, k, v and up),
    # then the float forward's gradients take the weights elsewhere
    assert steps[1] == runs[1][1][1] and abs(steps[3] - runs[1][1][3]) > 1e-4, (steps, runs[1][1])
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(1))
    q = copy.deepcopy(model)
    q.set_quantized(True)
    with torch.no_grad():
        assert not torch.equal(model.logits(model.hidden(ids)), q.logits(q.hidden(ids)))
    path, _ = tg.write_artifact(model, cfg, dist1(), quiet_log())
    loaded, _ = tg.load_artifact(path, CPU)
    sd, qnames = loaded.state_dict(), tg.quantized_tensors(model, cfg)
    for k, v in model.state_dict().items():
        if k in qnames:  # the export rounds the float weights to the alphabet
            assert torch.equal(sd[k], tg.dequantize_rows(*tg.quantize_rows(v, qnames[k]), qnames[k])), k


def _gptq_levels(cfg):
    model, info = tg.train(cfg, dist1(), quiet_log(Path(cfg.run_dir) / "train.log"))
    return info["gptq"], (Path(cfg.run_dir) / "train.log").read_text()


def test_gptq_calibrates_on_the_training_stream_only(tmp_path, small_data, monkeypatch):
    """The calibration reads training batches from the train loader, after training's: the val shard replaced by
    garbage gives the same levels, and nothing may read val at all during train()."""
    garbage = tmp_path / "garbage"
    (garbage / "fineweb_train_000000.bin").parent.mkdir()
    (garbage / "fineweb_train_000000.bin").symlink_to(DATA / "fineweb_train_000000.bin")
    write_shard(garbage / "fineweb_val_000000.bin", np.random.default_rng(0).integers(0, 1024, 8193))
    calls = []
    next_step = tg.TrainLoader.next_step
    monkeypatch.setattr(tg.TrainLoader, "next_step", lambda self: calls.append(1) or next_step(self))
    for name in ("ValData", "load_val_tokens"):
        monkeypatch.setattr(tg, name, lambda *a, **k: pytest.fail("train() read the val stream"))
    flags = dict(iterations=2, warmdown_iters=1, save_every=0, gptq=1, gptq_calib_seqs=40)
    a, log = _gptq_levels(smoke_cfg(tmp_path / "a", data_path=str(small_data), **flags))
    assert len(calls) == 2 + 2  # 2 training steps, then 40 sequences: a step's 32 and 8 of the next
    b, _ = _gptq_levels(smoke_cfg(tmp_path / "b", data_path=str(garbage), **flags))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "gptq: calib_seqs:40 tokens:5120 " in log


@pytest.mark.parametrize("reserve", [1.5, 0.0])
def test_gptq_reserve_comes_off_the_training_clock(tmp_path, reserve):
    cfg = smoke_cfg(tmp_path, iterations=1000, warmdown_iters=100, save_every=0, gptq=1, gptq_calib_seqs=8,
                    max_wallclock_seconds=2.0, gptq_reserve_s=reserve)
    _, info = tg.train(cfg, dist1(), quiet_log(tmp_path / "train.log"))
    log = (tmp_path / "train.log").read_text()
    stopped = float(log.split("stopped step:")[1].split("train_time:")[1].split("ms")[0]) / 1000
    gptq_s = float(log.split("gptq: calib_seqs:")[1].split("total:")[1].split("s")[0])
    assert stopped < 2.0 - reserve + 1.0 and info["train_time"] == pytest.approx(stopped + gptq_s, abs=0.06)
    assert ('"max_wallclock_seconds": 2.0' in log) and (("gptq: WARNING" in log) == (reserve == 0.0))


# ---------------------------------------------------------------------------------------------------
# bad input: a clear InputError naming the culprit
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,split", [("wrong_magic", "train"), ("id_out_of_vocab", "train"),
                                        ("truncated_tokens", "val"), ("no_shards", "train"), ("no_shards", "val")])
def test_cli_reports_bad_data_without_traceback(tmp_path, capsys, case, split):
    data = tmp_path / "data"
    other = "val" if split == "train" else "train"
    write_shard(data / f"fineweb_{other}_000000.bin", GOOD)
    bad = data / f"fineweb_{split}_000000.bin"
    if case != "no_shards":
        write_shard(bad, **BAD_SHARDS[case][0])
    with pytest.raises(SystemExit) as e:
        tg.main(["--preset", "smoke", "--data-path", str(data), "--run-dir", str(tmp_path / "run"),
                 "--tokenizer-path", str(TOKENIZER)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert (str(bad) if case != "no_shards" else f"no {split} shards") in err, err
    assert not (tmp_path / "run").exists()  # checked before the run folder is touched: a rerun is not refused


def test_cli_bad_resume_path(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for ck, words in ((tmp_path / "missing.pt", "no such file"), (junk, "not a readable checkpoint")):
        with pytest.raises(SystemExit) as e:
            tg.main(["--preset", "smoke", "--data-path", str(DATA), "--tokenizer-path", str(TOKENIZER),
                     "--run-dir", str(tmp_path / "run"), "--resume", str(ck)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert str(ck) in err and words in err, err
        assert not (tmp_path / "run").exists()  # refused before the run folder is touched, so a retry is not refused


def test_cli_resume_of_another_model_leaves_the_run_folder_alone(tmp_path, capsys):
    flags = dict(iterations=2, warmdown_iters=1, save_every=2)
    tg.train(smoke_cfg(tmp_path / "a", **flags), dist1(), quiet_log())
    with pytest.raises(SystemExit) as e:
        tg.main(["--preset", "smoke", "--data-path", str(DATA), "--tokenizer-path", str(TOKENIZER), "--model-dim",
                 "128", "--run-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "ckpt_step000002.pt")])
    assert e.value.code == 2 and "the checkpoint differs in MODEL_DIM (checkpoint 64, now 128)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("case,words", [("missing", "no such file"), ("folder", "not a file"),
                                        ("garbage", "cannot load it as a SentencePiece model"),
                                        ("vocab", "1024 tokens, but VOCAB_SIZE is 2048")])
def test_cli_checks_the_tokenizer_before_training(tmp_path, small_data, capsys, case, words):
    """(Regression: a missing tokenizer was reported after training; a mismatched one was never reported.)"""
    tok = {"missing": tmp_path / "none.model", "folder": tmp_path, "garbage": tmp_path / "junk.model",
           "vocab": TOKENIZER}[case]
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(SystemExit) as e:
        tg.main(["--preset", "smoke", "--data-path", str(small_data), "--tokenizer-path", str(tok), "--run-dir",
                 str(tmp_path / "run"), "--iterations", "2", "--warmdown-iters", "1", "--ttt", "0", "--slot", "off",
                 *(["--vocab-size", "2048"] if case == "vocab" else [])])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: TOKENIZER_PATH {tok}: {words}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # checked before training, and before the run folder is touched


@pytest.mark.parametrize("flags,words", [
    ({"matrix_lr": "-0.01"}, "MATRIX_LR must not be negative (got -0.01)"),
    ({"tied_embed_lr": "nan"}, "TIED_EMBED_LR must be finite (got nan)"),
    ({"scalar_lr": "inf"}, "SCALAR_LR must be finite (got inf)"),
    ({"ttt_lr": "-inf"}, "TTT_LR must be finite (got -inf)"),
    ({"slot_lr": "nan"}, "SLOT_LR must be finite"),
    ({"slot_lr_min": "-0.001"}, "SLOT_LR_MIN must not be negative"),
    ({"muon_wd": "-0.04"}, "MUON_WD must not be negative"),
    ({"adam_wd": "nan"}, "ADAM_WD must be finite"),
    ({"grad_clip_norm": "inf"}, "GRAD_CLIP_NORM must be finite"),
    ({"ttt_grad_clip": "-1"}, "TTT_GRAD_CLIP must not be negative"),
    ({"ema_decay": "1.5"}, "EMA_DECAY must be in [0, 1]"),
    ({"muon_momentum": "nan"}, "MUON_MOMENTUM must be finite"),
    ({"ttt_momentum": "-0.9"}, "TTT_MOMENTUM must not be negative"),
    ({"max_wallclock_seconds": "inf"}, "MAX_WALLCLOCK_SECONDS must be finite"),
    ({"eval_budget_s": "nan"}, "EVAL_BUDGET_S must be finite"),
    ({"logit_softcap": "0"}, "LOGIT_SOFTCAP must be positive"),
    ({"mlp_mult": "nan"}, "MLP_MULT must be positive"),
])
def test_build_config_refuses_nan_inf_or_negative_rates(flags, words):
    with pytest.raises(tg.InputError) as e:
        tg.build_config("smoke", flags=flags, env={})
    assert words in str(e.value), str(e.value)
    with pytest.raises(tg.InputError, match=words.split()[0]):  # the environment variable: the same check
        tg.build_config("smoke", env={words.split()[0]: next(iter(flags.values()))})


def test_build_config_keeps_meaningful_float_values():
    assert tg.build_config("smoke", flags={"eval_budget_s": "inf", "qk_gain_init": "-1", "muon_wd": "0"}, env={})


def test_build_config_bad_preset():
    with pytest.raises(tg.InputError, match="unknown preset 'h200'.*h100, v61, 3090, smoke"):
        tg.build_config("h200", env={})


@pytest.mark.parametrize("flags,words", [
    ({"iterations": "many"}, "iterations='many' is not a valid int"),
    ({"matrix_lr": "fast"}, "matrix_lr='fast' is not a valid float"),
    ({"iterations": "nan"}, "is not a valid int"),
    ({"num_heads": 3}, "MODEL_DIM must be a multiple of NUM_HEADS"),
    ({"num_kv_heads": 3}, "NUM_HEADS must be a multiple of NUM_KV_HEADS"),
    ({"rope_dims": 15}, "ROPE_DIMS"),
    ({"ve_layers": "2,9"}, "VE_LAYERS"),
    ({"train_batch_tokens": 4000}, "TRAIN_BATCH_TOKENS"),
    ({"final_weights": "best"}, "FINAL_WEIGHTS"),
    ({"compressor": "gzip"}, "COMPRESSOR"),
    ({"embed_bits": 4}, "EMBED_BITS"), ({"table_bits": 6}, "TABLE_BITS"),
    ({"slot": "yes"}, "SLOT"),
    ({"ttt_optimizer": "adam"}, "TTT_OPTIMIZER"),
    ({"eval_stride": 0}, "EVAL_STRIDE"),
    ({"eval_stride": 256}, "EVAL_STRIDE"),
    ({"warmdown_iters": 31}, "WARMDOWN_ITERS"),
    ({"iterations": 0, "warmdown_iters": 0}, "ITERATIONS"),
    ({"gptq": 2}, "GPTQ must be 0 or 1 (got 2)"), ({"qat": 3}, "QAT must be 0 or 1 (got 3)"),
    ({"gptq_calib_seqs": -1}, "GPTQ_CALIB_SEQS must be positive (got -1)"),
    ({"gptq_calib_seqs": 0}, "GPTQ_CALIB_SEQS must be positive"),
    ({"gptq_reserve_s": "-1"}, "GPTQ_RESERVE_S must not be negative"),
    ({"gptq_reserve_s": "nan"}, "GPTQ_RESERVE_S must be finite"),
    ({"gptq": 1, "max_wallclock_seconds": 5, "gptq_reserve_s": 5}, "GPTQ_RESERVE_S must be less than MAX_WALLCLOCK_SECONDS"),
])
def test_build_config_bad_flag_values(flags, words):
    with pytest.raises(tg.InputError) as e:
        tg.build_config("smoke", flags=flags, env={})
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize("env,words", [({"GPTQ": "2"}, "error: GPTQ must be 0 or 1"), ({"QAT": "3"}, "error: QAT must be 0 or 1"),
                                       ({"GPTQ_CALIB_SEQS": "-64"}, "error: GPTQ_CALIB_SEQS must be positive"),
                                       ({"GPTQ_RESERVE_S": "-8"}, "error: GPTQ_RESERVE_S must not be negative")])
def test_cli_refuses_bad_gptq_and_qat_settings(tmp_path, monkeypatch, capsys, env, words):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        tg.main(["--preset", "smoke", "--run-dir", str(tmp_path / "run")])
    assert e.value.code == 2 and words in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_build_config_env_names_the_variable():
    with pytest.raises(tg.InputError, match="ITERATIONS='x'"):
        tg.build_config("smoke", env={"ITERATIONS": "x"})


def test_build_config_precedence_preset_env_flag():
    assert tg.build_config("smoke", env={}).iterations == 30
    assert tg.build_config("smoke", env={"ITERATIONS": "20"}).iterations == 20
    assert tg.build_config("smoke", flags={"iterations": "25"}, env={"ITERATIONS": "20"}).iterations == 25
    assert tg.build_config("smoke", flags={"iterations": "1e2", "warmdown_iters": 0}, env={}).iterations == 100
    cfg = tg.build_config("h100", env={})
    assert cfg.run_dir == "runs/h100_s1337" and cfg == tg.Config(run_dir="runs/h100_s1337", **tg.PRESETS["h100"])


@pytest.mark.parametrize("flags,words", [
    # each of these once escaped as ZeroDivisionError / ValueError / OverflowError, or was accepted
    ({"num_heads": 0}, "NUM_HEADS"),
    ({"num_kv_heads": 0}, "NUM_KV_HEADS"),
    ({"train_seq_len": 0}, "TRAIN_SEQ_LEN"),
    ({"ve_layers": "a"}, "VE_LAYERS"),
    ({"iterations": "inf"}, "iterations='inf' is not a valid int"),
    ({"micro_batch_seqs": 0}, "MICRO_BATCH_SEQS"),
    ({"micro_batch_seqs": -16}, "MICRO_BATCH_SEQS"),  # was accepted: grad_accum -2, train_loss:nan
    ({"eval_batch_seqs": 0}, "EVAL_BATCH_SEQS"),
    ({"vocab_size": 0}, "VOCAB_SIZE"),
    ({"bigram_vocab": 1}, "BIGRAM_VOCAB"),
])
def test_build_config_degenerate_values_are_input_errors(flags, words):
    with pytest.raises(tg.InputError) as e:
        tg.build_config("smoke", flags=flags, env={})
    assert words in str(e.value), str(e.value)



# ---------------------------------------------------------------------------------------------------
# weight averaging
# ---------------------------------------------------------------------------------------------------


def _snapshot_steps(cfg):
    model = tg.GPT(cfg)
    avg, taken = tg.WeightAverage(model, cfg), []
    for step in range(cfg.iterations):
        before = avg.count
        avg.update(model, step, tg.lr_scale(cfg, step, 0.0), step)
        if avg.count > before:
            taken.append(step)
    return taken


def test_swa_snapshots_come_from_the_warmdown(tmp_path):
    cfg = smoke_cfg(tmp_path, iterations=30, warmup_steps=0)
    # warm-down covers the last 10 of 30 steps; scale < 0.5 from step 26 on; every 2nd step
    assert _snapshot_steps(cfg) == [27, 29]


def test_swa_takes_no_snapshot_during_warmup(tmp_path):
    """The lr scale is also low during the warm-UP; SWA must only average warm-down weights. (Regression: the
    smoke preset once averaged a snapshot from step 2 of 30 into the final weights.)"""
    cfg = smoke_cfg(tmp_path)  # warmup_steps=5, swa_start_scale=0.5, swa_every=2
    taken = _snapshot_steps(cfg)
    assert taken and min(taken) >= cfg.iterations - cfg.warmdown_iters, taken


def test_weight_average_apply(tmp_path):
    cfg = smoke_cfg(tmp_path, final_weights="ema", ema_decay=0.5)
    model = tg.GPT(cfg)
    w0 = model.tok_emb.weight.detach().clone()
    avg = tg.WeightAverage(model, cfg)
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    avg.update(model, 0, 1.0, 0)
    assert "final_weights:ema updates:1" == avg.apply(model)
    torch.testing.assert_close(model.tok_emb.weight.detach(), w0 + 0.5)
    live = smoke_cfg(tmp_path, final_weights="live")
    assert tg.WeightAverage(tg.GPT(live), live).apply(model) == "final_weights:live"


def test_step_clock_keeps_one_step_queued(monkeypatch):
    """The GPU loop's clock on CPU with stand-in step markers and a fake wall clock: after enqueuing step k the host
    waits for step k-1's marker only; the next step's start is the time k-1 finished plus one mean finished step;
    a full synchronization (logged steps, a segment's first two steps) leaves nothing running."""
    synced, t = [], [100.0]

    class Marker:
        def __init__(self):
            self.n = len(made) + 1
            made.append(self)

        def record(self):
            pass

        def synchronize(self):
            synced.append(self.n)

    made = []
    monkeypatch.setattr(tg.time, "perf_counter", lambda: t[0])
    clock = tg.StepClock(tg.Dist(), 50.0, 0, event=Marker)
    assert clock.next_start(0) == 50.0
    t[0] = 101.0
    clock.enqueued(1, wait_all=False)  # no finished step yet to take a mean from: waits for all
    assert clock.running is None and clock.next_start(1) == 51.0
    t[0] = 102.0
    clock.enqueued(2, wait_all=False)  # step 2 stays queued
    assert synced == [] and clock.running is made[1]
    assert clock.next_start(2) == 50.0 + 2.0 + 2.0 / 1  # step 1 finished at 2 s; step 2 takes one mean step more
    t[0] = 104.0
    clock.enqueued(3, wait_all=False)
    assert synced == [2] and clock.running is made[2]  # waited for step 2, not step 3
    assert clock.next_start(3) == 50.0 + 4.0 + 4.0 / 2
    clock.enqueued(4, wait_all=True)
    assert synced == [2, 3] and clock.running is None and clock.next_start(4) == 54.0
    assert clock.stop() == 54.0


def test_lr_schedule_by_iterations(tmp_path):
    cfg = smoke_cfg(tmp_path)  # 30 iterations, warm-up 5, warm-down 10
    got = [tg.lr_scale(cfg, s, 0.0) for s in range(30)]
    assert got[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert got[5:20] == [1.0] * 15
    assert got[20:] == pytest.approx([(30 - s) / 10 for s in range(20, 30)])


def test_lr_schedule_by_wallclock(tmp_path):
    cfg = smoke_cfg(tmp_path, max_wallclock_seconds=100, warmup_steps=0)  # warm-down: last 10/30 of 100 s
    assert tg.lr_scale(cfg, 1000, 0.0) == 1.0 and tg.lr_scale(cfg, 3, 60.0) == 1.0
    assert tg.lr_scale(cfg, 3, 100 - 100 / 6) == pytest.approx(0.5)
    assert tg.lr_scale(cfg, 3, 100.0) == 0.0


def test_warmup_by_clock_lasts_the_clocks_share_of_iterations(tmp_path):
    """WARMUP_BY_CLOCK: warm-up over WARMUP_STEPS/ITERATIONS of the clock (5/30 of 120 s = 20 s), whatever the
    step count; the Muon momentum warm-up and the SWA warm-up guard count the same clock step."""
    cfg = smoke_cfg(tmp_path, max_wallclock_seconds=120, warmup_by_clock=1)  # warm-down: last 40 s
    assert tg.warmup_step(cfg, 3, 10.0) == pytest.approx(2.5)
    assert tg.lr_scale(cfg, 3, 10.0) == pytest.approx(3.5 / 5)  # step 3 of a slow run, half-way by the clock
    assert tg.lr_scale(cfg, 3, 20.0) == 1.0 and tg.lr_scale(cfg, 1000, 50.0) == 1.0
    assert tg.lr_scale(cfg, 3, 100.0) == pytest.approx(0.5)
    opt = tg.Optimizers(tg.GPT(cfg), cfg, dist1())
    assert opt.muon_momentum(tg.warmup_step(cfg, 0, 120.0 * 10 / 30)) == cfg.muon_momentum  # 10 of 30 by the clock
    by_steps = smoke_cfg(tmp_path, max_wallclock_seconds=120)
    assert tg.warmup_step(by_steps, 3, 10.0) == 3 and tg.lr_scale(by_steps, 3, 10.0) == pytest.approx(4 / 5)


def test_periodic_val_does_not_change_training(tmp_path, small_data):
    flags = dict(data_path=str(small_data), iterations=4, warmdown_iters=2, log_every=1, save_every=0)
    a, b = tmp_path / "a", tmp_path / "b"
    ma, _ = tg.train(smoke_cfg(a, **flags), dist1(), quiet_log(a / "train.log"))
    mb, _ = tg.train(smoke_cfg(b, val_every=2, **flags), dist1(), quiet_log(b / "train.log"))
    assert "step:2/4 val_loss:" in (b / "train.log").read_text()
    assert "val_loss" not in (a / "train.log").read_text()
    sa, sb = ma.state_dict(), mb.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("final_weights", ["swa", "ema"])
def test_resume_is_bit_exact(tmp_path, final_weights):
    flags = dict(iterations=6, warmdown_iters=3, save_every=3, final_weights=final_weights, log_every=1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tg.train(smoke_cfg(straight, **flags), dist1(), quiet_log(straight / "train.log"))
    ck = straight / "ckpt_step000003.pt"
    assert ck.exists() and (straight / "ckpt_step000006.pt").exists()
    _, info = tg.train(smoke_cfg(resumed, **flags), dist1(), quiet_log(resumed / "train.log"),
                       tg.load_checkpoint(str(ck), torch.device("cpu"), smoke_cfg(resumed, **flags)))
    assert info["steps"] == 6
    a = torch.load(straight / "model.pt", weights_only=True)["model"]
    b = torch.load(resumed / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff
    la, lb = parse_steps((straight / "train.log").read_text()), parse_steps((resumed / "train.log").read_text())
    assert sorted(lb) == [4, 5, 6] and all(la[s] == lb[s] for s in lb)
    assert "resumed:" in (resumed / "train.log").read_text()
    fw = [[ln for ln in (r / "train.log").read_text().splitlines() if ln.startswith("final_weights:")]
          for r in (straight, resumed)]
    assert fw[0] == fw[1] and len(fw[0]) == 1 and "live" not in fw[0][0]  # the average state was resumed too
    # and the weights really moved between step 3 and 6 (the comparison is not of two copies of the ckpt)
    c = torch.load(ck, weights_only=True)["model"]
    assert any(not torch.equal(c[k], a[k]) for k in a)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    """(Regression: ended in a state_dict traceback after building and compiling the model.)"""
    flags = dict(iterations=2, warmdown_iters=1, save_every=2)
    tg.train(smoke_cfg(tmp_path / "a", **flags), dist1(), quiet_log())
    ck = tmp_path / "a" / "ckpt_step000002.pt"
    other = smoke_cfg(tmp_path / "b", model_dim=128, num_layers=5, mlp_mult=3.0, matrix_lr=0.01, **flags)
    with pytest.raises(tg.InputError) as e:
        tg.load_checkpoint(str(ck), torch.device("cpu"), other)
    assert str(e.value) == (f"--resume {ck}: the checkpoint differs in NUM_LAYERS (checkpoint 4, now 5), "
                            "MODEL_DIM (checkpoint 64, now 128), MLP_MULT (checkpoint 2.0, now 3.0)")


def test_resume_from_an_earlier_checkpoint_keeps_its_new_checkpoints(tmp_path):
    """The keep-latest-two rule counts only checkpoints up to the step just saved. (Regression: resuming step 3
    in a folder that also held steps 6 and 9 deleted each new checkpoint as soon as it was written.)"""
    flags = dict(iterations=6, warmdown_iters=3, save_every=3)
    tg.train(smoke_cfg(tmp_path, **flags), dist1(), quiet_log())
    (tmp_path / "ckpt_step000009.pt").write_bytes((tmp_path / "ckpt_step000006.pt").read_bytes())
    six = (tmp_path / "ckpt_step000006.pt").stat().st_mtime_ns
    cfg = smoke_cfg(tmp_path, **{**flags, "save_every": 1})
    tg.train(cfg, dist1(), quiet_log(), tg.load_checkpoint(str(tmp_path / "ckpt_step000003.pt"), torch.device("cpu"), cfg))
    assert sorted(p.name for p in tmp_path.glob("ckpt_step*.pt")) == [
        "ckpt_step000005.pt", "ckpt_step000006.pt", "ckpt_step000009.pt"]
    assert (tmp_path / "ckpt_step000006.pt").stat().st_mtime_ns != six  # the resumed run's own step 6


def test_training_that_diverges_stops_with_an_error(tmp_path):
    """(Regression: a NaN loss trained on to the end and shipped a NaN model.)"""
    cfg = smoke_cfg(tmp_path, iterations=6, warmdown_iters=1, log_every=1, save_every=0, warmup_steps=0,
                    matrix_lr=1e30, tied_embed_lr=1e30, scalar_lr=1e30)
    with pytest.raises(tg.InputError, match=r"^training diverged at step 2 \(loss nan\); "):
        tg.train(cfg, dist1(), quiet_log())
    assert not (tmp_path / "model.pt").exists()


# ---------------------------------------------------------------------------------------------------
# the run folder holds one run
# ---------------------------------------------------------------------------------------------------

OLD_RUN = {"train.log": "step:400/9000 train_loss:3.0\n", "ckpt_step000400.pt": "x", "ckpt_step000600.pt": "x",
           "model.pt": "x", "model.hqa": "x", "submission.json": "{}", "eval.log": "old eval\n", "nll.npy": "x"}


def _old_run(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in OLD_RUN.items():
        (folder / name).write_text(text)
    return folder


def test_cli_refuses_a_run_folder_that_holds_a_run(tmp_path, capsys):
    """(Regression: a second run appended to the first's train.log, and the keep-latest-two rule deleted the new
    run's checkpoints in favour of the old run's later ones.)"""
    run = _old_run(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        tg.main(["--preset", "smoke", "--data-path", str(DATA), "--tokenizer-path", str(TOKENIZER), "--run-dir",
                 str(run), "--iterations", "2", "--warmdown-iters", "1", "--ttt", "0", "--slot", "off"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: run folder {run} already holds a run (train.log, ckpt_step000400.pt, "
                                       "ckpt_step000600.pt, ...); use --resume CKPT to continue it or --overwrite "
                                       "to replace it\n")
    assert {p.name: p.read_text() for p in run.iterdir()} == OLD_RUN  # untouched


def test_overwrite_removes_the_old_runs_files_and_orphan_temp_files(tmp_path):
    run = _old_run(tmp_path)
    dead = run / "model.pt.tmp99999999"  # beyond any pid_max: the writer has exited
    live, other = run / f"eval.log.tmp{os.getpid()}", run / "notes.tmpl"
    for p in (dead, live, other, run / "train.out"):
        p.write_text("x")
    with pytest.raises(tg.InputError, match="use --resume CKPT"):
        tg.claim_run_dir(str(run), tg.RUN_FILES, overwrite=False)
    line = tg.claim_run_dir(str(run), tg.RUN_FILES, overwrite=True)
    assert line == (f"run_dir:{run} orphan_temp_files_removed:1 overwrite_removed:train.log,ckpt_step000400.pt,"
                    "ckpt_step000600.pt,model.pt,model.hqa,submission.json,eval.log,nll.npy")
    assert sorted(p.name for p in run.iterdir()) == sorted([live.name, other.name, "train.out"])
    assert tg.claim_run_dir(str(run), tg.RUN_FILES, overwrite=False) == f"run_dir:{run} orphan_temp_files_removed:0"


def test_eval_only_refuses_an_eval_log_but_not_its_own_run_folder(tmp_path, trained, small_data, capsys):
    """--eval-only of a run's own artifact into that run's folder is normal use; a second one must not append to
    (or silently replace) the first's eval.log."""
    cfg = copy.deepcopy(trained["cfg"])
    cfg.run_dir = str(tmp_path)
    path, _ = tg.write_artifact(trained["model"], cfg, dist1(), quiet_log(tmp_path / "train.log"))
    args = ["--preset", "smoke", "--eval-only", path, "--data-path", str(small_data), "--tokenizer-path",
            str(TOKENIZER), "--run-dir", str(tmp_path), "--ttt", "0", "--slot", "off", "--eval-stride", "128"]
    tg.main(args)
    first = (tmp_path / "eval.log").read_text()
    assert "final_sliding" in first and "eval.log" not in first  # nothing of the training run was removed
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tg.main(args)
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"error: run folder {tmp_path} already holds a run (eval.log); use --overwrite to replace it\n")
    assert (tmp_path / "eval.log").read_text() == first
    tg.main([*args, "--overwrite"])
    second = (tmp_path / "eval.log").read_text()
    assert second.count("inductor:") == 1 and "overwrite_removed:eval.log" in second
    assert (tmp_path / "train.log").exists() and (tmp_path / "model.hqa").exists()


# ---------------------------------------------------------------------------------------------------
# distributed: torchrun --nproc_per_node=2 (gloo) == 1 process with the same global batch
# ---------------------------------------------------------------------------------------------------


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
SCRIPT = str(ROOT / "train_gpt.py")


EXIT_ABORT = "terminate called without an active exception"


def _run(cmd, log_path, done_marker, timeout=300):
    """Run a CLI command; return its log. `done_marker` must be in the log: the run finished its work.

    Known issue (reported, not root-caused): a 2-rank gloo run sometimes (~10-30 %) ends with rank 1 aborting at
    interpreter exit ("terminate called without an active exception", SIGABRT, torchrun rc 1) after all work is
    done and written. That exact signature, with the run's outputs complete, is reported as a warning
    instead of failing every test that uses torchrun; any other non-zero exit fails."""
    env = {k: v for k, v in os.environ.items() if k not in LEAKY_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    msg = f"{cmd}\nrc={p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
    log = log_path.read_text() if log_path.exists() else ""
    if p.returncode != 0:
        known = EXIT_ABORT in p.stderr and done_marker in log and "Traceback" not in p.stderr.split(EXIT_ABORT)[0]
        assert known, msg
        warnings.warn(f"torchrun: rank aborted at exit after finishing ({EXIT_ABORT!r}): {' '.join(cmd[-4:])}")
    assert done_marker in log, msg
    return log


def _common(small_data):
    """Same global batch (32 x 128 tokens): 1 process x 2 micro-batches of 16, or 2 ranks x 1 micro-batch."""
    return ["--preset", "smoke", "--data-path", str(small_data), "--tokenizer-path", str(TOKENIZER),
            "--train-batch-tokens", "4096", "--train-seq-len", "128", "--micro-batch-seqs", "16",
            "--iterations", "4", "--warmdown-iters", "2", "--log-every", "1", "--save-every", "2",
            "--eval-seq-len", "128", "--eval-stride", "64", "--slot", "causal", "--slot-steps", "2", "--ttt", "0"]


@pytest.fixture(scope="module")
def single_run(small_data, tmp_path_factory):
    """The full pipeline in one process (train, raw eval, artifact, sliding + causal SLOT eval)."""
    one = tmp_path_factory.mktemp("one")
    log = _run([sys.executable, SCRIPT, *_common(small_data), "--run-dir", str(one),
                "--save-nll", str(one / "nll.npy")], one / "train.log", "saved:" + str(one / "submission.json"))
    return one, log


def test_torchrun_two_ranks_match_single_process(tmp_path, small_data, single_run):
    """The full pipeline on 2 gloo ranks: same losses, same weights, same eval metrics and NLLs."""
    one, log1 = single_run
    two = tmp_path / "two"
    log2 = _run([*TORCHRUN, SCRIPT, *_common(small_data), "--run-dir", str(two), "--save-nll", str(two / "nll.npy")],
                two / "train.log", "saved:" + str(two / "submission.json"))

    assert "world_size:1" in log1 and "grad_accum:2" in log1
    assert "world_size:2" in log2 and "grad_accum:1" in log2 and "ranks_agree:2 step:4" in log2
    s1, s2 = parse_steps(log1), parse_steps(log2)
    assert sorted(s1) == sorted(s2) == [1, 2, 3, 4]
    for s in s1:
        assert abs(s1[s] - s2[s]) < 1e-3, (s, s1[s], s2[s])
    assert s1[4] < s1[1]  # it trained

    a = torch.load(one / "model.pt", weights_only=True)["model"]
    b = torch.load(two / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=k)

    # distributed evaluation: same metric in every mode; gathered NLLs come back in stream order
    j1, j2 = (json.loads((r / "submission.json").read_text()) for r in (one, two))
    assert set(j1["eval_modes"]) == set(j2["eval_modes"]) == {"roundtrip", "sliding", "slot_causal"}
    for m in j1["eval_modes"]:
        for key in ("val_loss", "val_bpb"):
            assert abs(j1["eval_modes"][m][key] - j2["eval_modes"][m][key]) < 1e-4, (m, key)
    assert j1["score_mode"] == j2["score_mode"] == "slot_causal" and j2["hardware"].startswith("2x")
    assert j1["record_legal"] and j2["record_legal"]
    n1, n2 = np.load(one / "nll.npy"), np.load(two / "nll.npy")
    assert n1.dtype == n2.dtype == np.float64 and len(n1) == len(n2) == 8192
    np.testing.assert_allclose(n1, n2, atol=1e-4)
    assert abs(n2.mean() - j2["eval_modes"]["slot_causal"]["val_loss"]) < 1e-9


def test_torchrun_resumes_a_single_process_checkpoint(tmp_path, small_data, single_run):
    """Checkpoints are world-size independent: resume step 2 of the 1-process run on 2 ranks."""
    one, _ = single_run
    res = tmp_path / "resumed"
    log = _run([*TORCHRUN, SCRIPT, *_common(small_data), "--run-dir", str(res), "--slot", "off",
                "--resume", str(one / "ckpt_step000002.pt")], res / "train.log", "saved:" + str(res / "submission.json"))
    assert "resumed:" in log and sorted(parse_steps(log)) == [3, 4] and "ranks_agree:2 step:4" in log
    a = torch.load(one / "model.pt", weights_only=True)["model"]
    c = torch.load(res / "model.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], c[k], atol=1e-4, rtol=0, msg=k)


@pytest.mark.parametrize("case", ["run_folder", "diverged"])
def test_torchrun_every_rank_stops_with_the_error(tmp_path, small_data, case):
    """Rank 0 alone checks the run folder, and each rank sees only its own loss: both ranks must stop with the same
    `error:` line and exit code 2, and neither may be left waiting in a collective."""
    run = _old_run(tmp_path / "run") if case == "run_folder" else tmp_path / "run"
    extra = ["--matrix-lr", "1e30", "--tied-embed-lr", "1e30", "--scalar-lr", "1e30", "--warmup-steps", "0"]
    env = {k: v for k, v in os.environ.items() if k not in LEAKY_ENV}
    p = subprocess.run([*TORCHRUN, SCRIPT, *_common(small_data), "--run-dir", str(run), "--slot", "off",
                        *(extra if case == "diverged" else [])], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=240)
    want = (f"error: run folder {run} already holds a run" if case == "run_folder" else
            "error: training diverged at step 2 (loss nan); ")
    assert p.returncode != 0 and p.stderr.count(want) == 2, p.stderr[-3000:]
    assert "exitcode  : 2" in p.stderr and 'train_gpt.py", line' not in p.stderr  # no traceback of ours (torchrun's own)
    if case == "run_folder":
        assert {f.name: f.read_text() for f in run.iterdir()} == OLD_RUN
    else:
        assert "step:1/4 train_loss:" in (run / "train.log").read_text() and not (run / "model.pt").exists()


def test_torchrun_ttt_matches_single_process(tmp_path, small_data, single_run):
    """Each rank scores a slice of every TTT chunk, so its targets are not one contiguous run: the byte count
    (val_bpb) and the --save-nll order must still be those of the single-process run. (Regression: the
    bytes were once counted as one contiguous block per rank -- val_bpb 3.6675 on 2 ranks vs 3.7212 on 1 --
    and the saved NLLs came back out of stream order.)"""
    one, _ = single_run
    flags = ["--preset", "smoke", "--data-path", str(small_data), "--tokenizer-path", str(TOKENIZER),
             "--eval-only", str(one / "model.hqa"), "--eval-stride", "128", "--slot", "off", "--ttt", "1",
             "--ttt-chunk-tokens", "2048", "--ttt-lr", "0.01"]
    e1, e2 = tmp_path / "e1", tmp_path / "e2"
    tg.main([*flags, "--run-dir", str(e1), "--save-nll", str(e1 / "nll.npy")])
    log2 = _run([*TORCHRUN, SCRIPT, *flags, "--run-dir", str(e2), "--save-nll", str(e2 / "nll.npy")], e2 / "eval.log",
                "eval_phases:")
    log1 = (e1 / "eval.log").read_text()
    assert "ttt: chunks:4" in log1 and "ttt: chunks:4" in log2

    def final(log):
        line = next(ln for ln in log.splitlines() if ln.startswith("final_ttt "))
        return {k: float(v) for k, v in (kv.split(":") for kv in line.split()[1:3])}
    r1, r2 = final(log1), final(log2)
    assert abs(r1["val_loss"] - r2["val_loss"]) < 1e-4
    n1, n2 = np.load(e1 / "nll.npy"), np.load(e2 / "nll.npy")
    assert abs(r1["val_bpb"] - r2["val_bpb"]) < 1e-4, (r1, r2)
    np.testing.assert_allclose(n1, n2, atol=1e-4)


def test_torchrun_gptq_sums_the_ranks_hessians(tmp_path, small_data):
    """GPTQ=1 on 2 ranks: each calibrates on its own half of a training step (16 sequences), their Hessians are summed,
    so the levels are those of one process calibrating on the whole step (up to rounding ties: fp32 sums in
    another order, and weights that agree to 1e-4)."""
    two = tmp_path / "two"
    flags = ["--slot", "off", "--ttt", "0", "--gptq", "1", "--gptq-calib-seqs", "32"]
    log2 = _run([*TORCHRUN, SCRIPT, *_common(small_data), *flags, "--run-dir", str(two)], two / "train.log",
                "saved:" + str(two / "submission.json"))
    assert "world_size:2" in log2 and "gptq: calib_seqs:32 tokens:4096 " in log2
    cfg = smoke_cfg(tmp_path / "one", data_path=str(small_data), train_batch_tokens=4096, train_seq_len=128,
                    micro_batch_seqs=16, iterations=4, warmdown_iters=2, gptq=1, gptq_calib_seqs=32)  # as _common's
    model, info = tg.train(cfg, dist1(), quiet_log())
    _, one = tg.parse_artifact(tg.build_artifact(model, cfg, info["gptq"])[0], "one")
    _, got = tg.parse_artifact((two / "model.hqa").read_bytes(), "two")
    for k in info["gptq"]:
        same = (one[k] == got[k]).float().mean().item()
        assert same > 0.999, (k, same)  # one rank's half alone: 0.81-0.88 (measured)


@pytest.mark.parametrize("value", ["1.5", "nan", "-inf"])
def test_fractional_or_nonfinite_int_flag_is_refused(value):
    with pytest.raises(tg.InputError, match="ITERATIONS|iterations"):
        tg.build_config("smoke", flags={"iterations": value}, env={})


def test_muon_step_matches_a_per_matrix_reference():
    """The flat, shape-grouped Muon equals the plain per-matrix rule: Nesterov momentum, Newton-Schulz,
    sqrt(rows/cols) scaling for tall matrices, decoupled weight decay, over two steps."""
    torch.manual_seed(0)
    shapes = [(8, 4), (4, 8), (8, 4), (6, 6), (4, 8), (3, 5)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    mom = [torch.zeros(s) for s in shapes]
    muon = hq_optim.ParallelMuon([(f"w{i}", p) for i, p in enumerate(params)], dist1(), ns_steps=5)
    lr, wd, beta = 0.1, 0.04, 0.9
    for _ in range(2):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        muon.step(muon.reduce_grads(), lr, beta, wd)
        for i, g in enumerate(grads):
            mom[i] = beta * mom[i] + g
            u = hq_optim.zeropower_ns5((g + beta * mom[i])[None], 5)[0].float() * max(1.0, shapes[i][0] / shapes[i][1]) ** 0.5
            ref[i] = ref[i] * (1 - lr * wd) - lr * u.bfloat16().float()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=2e-3)
    sd = muon.state_dict()
    assert all(torch.allclose(sd[f"w{i}"], mom[i], atol=1e-6) for i in range(len(shapes)))
