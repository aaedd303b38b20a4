"""Per-document LoRA TTT (hq_doc_ttt.py) on an artifact, against sliding windows (and optionally the full-parameter
chunk TTT of train_gpt.eval_ttt) on the same first N val targets: bpb, seconds, targets/s, and a paired test by
document against sliding. Comma lists in --rank/--chunk/--lr/--batch run every combination (one load, one
sliding pass).

  DATA_PATH=DIR TOKENIZER_PATH=FILE python bench/doc_ttt_probe.py ARTIFACT [--targets N] [--rank 8] [--chunk 48]
      [--lr 0.001] [--batch 64] [--context 0] [--sites q,v,head] [--full-ttt] [--compile] [--out DIR]

The artifact's recorded eval settings apply (EVAL_SEQ_LEN, EVAL_STRIDE, TTT_*); --context 0 means EVAL_SEQ_LEN.
Every mode's NLL dump (float64, stream order) goes to --out as <mode>.npy, for bench/paired_test.py-style pairing.
On CUDA each mode first runs untimed on the first 2 contexts' worth of targets (CUDA init, torch.compile).
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hq_doc_ttt as dt  # noqa: E402
import paired_test as pt  # noqa: E402
import train_gpt as tg  # noqa: E402


def numbers(text: str, kind):
    try:
        out = [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"error: {text!r} is not a comma-separated list of {kind.__name__}") from None
    if not out:
        raise SystemExit(f"error: {text!r} holds no values")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--targets", type=int, default=0, help="score the first N val targets (0: all)")
    ap.add_argument("--rank", default="8")
    ap.add_argument("--chunk", default="48")
    ap.add_argument("--lr", default="0.001")
    ap.add_argument("--batch", default="64", help="documents per batch")
    ap.add_argument("--context", type=int, default=0, help="tokens of a document a chunk sees (0: EVAL_SEQ_LEN)")
    ap.add_argument("--sites", default=",".join(dt.DEFAULT_SITES), help=f"some of {','.join(dt.SITES)}")
    ap.add_argument("--full-ttt", action="store_true", help="also run train_gpt.eval_ttt (full-parameter chunk TTT)")
    ap.add_argument("--no-sliding", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the LoRA forward (dynamic shapes)")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds per LoRA run before it stops adapting")
    ap.add_argument("--out", help="folder for the NLL dumps")
    ap.add_argument("--warmup", type=int, default=-1, help="targets of an untimed first pass per mode "
                    "(default: 2 * context on CUDA, none on CPU)")
    args = ap.parse_args(argv)
    data, tok = os.environ.get("DATA_PATH"), os.environ.get("TOKENIZER_PATH")
    if not (data and tok and Path(data).is_dir() and Path(tok).is_file()):
        sys.exit("error: set DATA_PATH (a folder with the val shard) and TOKENIZER_PATH (a file)")
    grid = list(itertools.product(numbers(args.rank, int), numbers(args.chunk, int), numbers(args.lr, float),
                                  numbers(args.batch, int)))
    sites = tuple(s.strip() for s in args.sites.split(",") if s.strip())
    if any(s not in dt.SITES for s in sites) or not sites:
        sys.exit(f"error: --sites takes some of {','.join(dt.SITES)}")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    d = tg.Dist(0, 1, device)
    evals: dict = {}
    try:
        model, cfg = tg.load_artifact(args.artifact, device, evals)
    except tg.InputError as e:
        sys.exit(f"error: {e}")
    for k, v in evals.items():
        setattr(cfg, k, v)
    cfg.data_path, cfg.tokenizer_path = data, tok
    if device.type == "cuda":
        tg.fast.tune_inductor(device)
    else:
        cfg.compile = 0
    tokens = tg.load_val_tokens(cfg)
    if args.targets:
        tokens = tokens[:args.targets + 1]
    val = tg.ValData(cfg, tokens=tokens)
    starts = dt.doc_starts(val.tokens, val.n)
    lens = np.diff(np.append(starts, val.n))
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device:{hw} targets:{val.n} docs:{len(starts)} doc_len mean:{lens.mean():.0f} median:{np.median(lens):.0f} "
          f"max:{lens.max()} eval_seq_len:{cfg.eval_seq_len} stride:{cfg.eval_stride}", flush=True)
    context = args.context or cfg.eval_seq_len
    warm = args.warmup if args.warmup >= 0 else (2 * context if device.type == "cuda" else 0)
    small = tg.ValData(cfg, tokens=tokens[:min(len(tokens), warm + 1)]) if warm > 0 else None
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    quiet = lambda msg: None  # noqa: E731
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    rows, nll = [], {}

    def record(mode: str, r: dict, extra: str = "") -> None:
        rows.append((mode, r["val_bpb"], r["seconds"], val.n / max(r["seconds"], 1e-9), extra))

    def run(mode: str, fn) -> None:
        if small is not None:
            fn(small, quiet, None)  # untimed warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        path = str(Path(args.out) / f"{mode}.npy") if args.out else str(Path("/tmp") / f"doc_ttt_probe_{os.getpid()}.npy")
        r = fn(val, log, path)
        nll[mode] = np.load(path)
        if not args.out:
            os.unlink(path)
        mem = f"peak_mem:{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB" if device.type == "cuda" else ""
        record(mode, r, mem)

    if not args.no_sliding:
        run("sliding", lambda v, lg, p: tg.evaluate(model, v, cfg, d, cfg.eval_stride, "sliding", log=lg, save_nll=p))
    if args.full_ttt:
        run("ttt_full", lambda v, lg, p: tg.eval_ttt(model, v, cfg, d, lg, time.perf_counter() + 1e9, p))
    for rank, chunk, lr, batch in grid:
        mode = f"lora_r{rank}_c{chunk}_lr{lr:g}_b{batch}"
        run(mode, lambda v, lg, p: dt.eval_doc_lora_ttt(
            model, v, cfg, d, lg, time.perf_counter() + args.budget, p, rank=rank, chunk=chunk, lr=lr,
            docs_per_batch=batch, context=context, targets=sites, compile=args.compile))
    units = pt.unit_ids(val.tokens, val.n, "doc", 0)
    print(f"\n{'mode':<34}{'val_bpb':>10}{'seconds':>10}{'targets/s':>12}  vs sliding (paired by document)")
    for mode, bpb, sec, rate, extra in rows:
        vs = ""
        if "sliding" in nll and mode != "sliding":
            r = pt.paired(nll[mode], nll["sliding"], val.bytes, units)
            lo, hi = r["ci95"]
            vs = (f"{r['delta']:+.5f} (95% CI {lo:+.5f}..{hi:+.5f}, p={r['p_two_sided']:.2g}, "
                  f"better in {r['a_better_units']}/{r['units']})")
        print(f"{mode:<34}{bpb:>10.5f}{sec:>10.1f}{rate:>12.0f}  {vs} {extra}".rstrip())
    assert all(np.isfinite(v).all() and len(v) == val.n for v in nll.values())
    print(f"bytes/target {val.bytes.mean():.4f}; bpb = nats/target / ln2 / bytes/target; nats of 1 bpb: "
          f"{math.log(2) * val.bytes.mean():.4f}")


if __name__ == "__main__":
    main()
