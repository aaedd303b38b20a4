"""GPTQ against round-to-nearest export of one trained model, with no retraining: the Hessians from the first N
sequences of the training shards, both artifacts built from the run's float weights (model.pt), and the float
model and both round trips scored on the same first val targets; paired test GPTQ - round by document.

  python bench/gptq_probe.py RUN/model.pt [--calib-seqs 64] [--targets N] [--device cpu|cuda] [--out DIR]
                             [--unit doc|block] [--block 2048]

DATA_PATH (train shards for the calibration, the val shard for the score) and TOKENIZER_PATH come from the
environment. The calibration runs the model as it trained (QAT's forward unless QAT=0), through
train_gpt.gptq_export, the code a GPTQ=1 run uses; a run's own calibration reads the stream where training
stopped, this one its start. Windows are the round trip's (non-overlapping, EVAL_SEQ_LEN long), so a delta is
the export's alone. Bytes: the rANS stream (the quantized levels) and the whole artifact compressed as the run
would (COMPRESSOR); GPTQ moves levels off the most common ones, which can cost bytes. A run whose recurrence
never started (stopped before RECUR_START) is probed with it on: model.pt does not record it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import paired_test as pt  # noqa: E402
from quant_probe import score_model  # noqa: E402
import train_gpt as tg  # noqa: E402


def run_config(saved: dict) -> tg.Config:
    """The run's Config from model.pt's dict (fields added since default to what older runs used)."""
    names = {f.name for f in fields(tg.Config)}
    cfg = tg.Config(**{k: v for k, v in saved.items() if k in names})
    for k, v in tg.MODEL_FIELDS_ADDED.items():
        if k not in saved:
            setattr(cfg, k, v)
    return cfg


def rans_bytes(payload: bytes) -> int:
    n = len(tg.hq_artifact.MAGIC)
    size = int.from_bytes(payload[n:n + 4], "little")
    return json.loads(payload[n + 4:n + 4 + size])["rans_bytes"]


def round_trip(payload: bytes, device) -> tg.GPT:
    mcfg, sd = tg.parse_artifact(payload, "probe")
    model = tg.GPT(mcfg)
    model.load_state_dict(sd, strict=True)
    model.set_quantized(False)  # the weights already are the dequantized values
    return model.to(device)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_pt", help="a run's model.pt (float weights and config)")
    ap.add_argument("--calib-seqs", type=int, default=64, help="training sequences (TRAIN_SEQ_LEN) for the Hessians")
    ap.add_argument("--targets", type=int, default=0, help="score the first N val targets (0: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="folder for the NLL dumps (float.npy, round.npy, gptq.npy)")
    ap.add_argument("--unit", choices=("doc", "block"), default="doc", help="the paired test's unit (paired_test.py)")
    ap.add_argument("--block", type=int, default=2048, help="targets per block (--unit block)")
    args = ap.parse_args(argv)
    data, tok = os.environ.get("DATA_PATH"), os.environ.get("TOKENIZER_PATH")
    if not (data and tok and Path(data).is_dir() and Path(tok).is_file()):
        sys.exit("error: set DATA_PATH (a folder with train and val shards) and TOKENIZER_PATH (a file)")
    if args.calib_seqs < 1 or args.targets < 0 or args.block < 1:
        sys.exit("error: --calib-seqs and --block must be positive, --targets not negative")
    try:
        ck = torch.load(args.model_pt, map_location="cpu", weights_only=True)
        cfg = run_config(ck["config"])
        cfg.data_path, cfg.tokenizer_path, cfg.gptq_calib_seqs, cfg.compile = data, tok, args.calib_seqs, 0
        cfg.max_wallclock_seconds = 0.0  # no training clock here: the reserve's warning means nothing
        tg.check_config(cfg)
    except (OSError, KeyError, TypeError, RuntimeError, tg.InputError) as e:
        sys.exit(f"error: {args.model_pt}: not a usable model.pt ({type(e).__name__}: {e})")
    device = torch.device(args.device)
    d = tg.Dist(0, 1, device)
    model = tg.GPT(cfg)
    model.load_state_dict(ck["model"], strict=True)
    model.to(device).set_quantized(bool(cfg.qat))  # calibrate on the forward it trained with
    try:
        levels, _ = tg.gptq_export(model, cfg, d, tg.TrainLoader(cfg, d), tg.Log(d, None))
    except tg.InputError as e:
        sys.exit(f"error: {e}")
    arts, models = {}, {"float": model}
    for name, lv in (("round", None), ("gptq", levels)):
        t0 = time.perf_counter()
        payload, table = tg.build_artifact(model, cfg, lv)
        packed = tg.hq_artifact.compress(payload, cfg.compressor)
        arts[name] = {"rans": rans_bytes(payload), "packed": len(packed), "groups": {g: b for g, _, _, b in table}}
        models[name] = round_trip(payload, device)
        print(f"{name}: artifact built, compressed and loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    model.set_quantized(False)  # the float model: its weights as trained, unquantized
    tokens = tg.load_val_tokens(cfg)
    if args.targets:
        tokens = tokens[:args.targets + 1]
    val, nll = tg.ValData(cfg, tokens=tokens), {}
    for name, m in models.items():
        nll[name] = score_model(name, m, val, cfg, d, args.out)
    r, g = arts["round"], arts["gptq"]
    print(f"bytes: rANS stream round {r['rans']:,} gptq {g['rans']:,} ({g['rans'] - r['rans']:+,}); "
          f"artifact ({cfg.compressor}) round {r['packed']:,} gptq {g['packed']:,} ({g['packed'] - r['packed']:+,})")
    for grp in r["groups"]:
        if grp not in ("fp16 passthrough", "header+framing"):
            print(f"bytes: {grp:<16} round {r['groups'][grp]:>12,.0f} gptq {g['groups'][grp]:>12,.0f} "
                  f"({g['groups'][grp] - r['groups'][grp]:+,.0f})")
    res = pt.paired(nll["gptq"], nll["round"], val.bytes, pt.unit_ids(val.tokens, val.n, args.unit, args.block))
    print(pt.report(res, "gptq", "round"))


if __name__ == "__main__":
    main()
