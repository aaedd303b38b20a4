"""What storing more of an artifact's fp16 tensors as integers would cost in bpb and save in bytes, with no training:
re-quantize the named tensors per row at int-BITS (the export quantizer, so no QAT: as EMBED_BITS does for
tok_emb) and score both models on the same first N val targets; paired test by document.

  python bench/quant_probe.py ARTIFACT --bits 8 --tensors tok_emb.weight,bigram_embed.weight [--targets N]

DATA_PATH (the folder with the val shard) and TOKENIZER_PATH come from the environment. Windows are the
round trip's (non-overlapping, EVAL_SEQ_LEN long), so the delta is the quantization's alone. Bytes are the
symbols' order-0 entropy plus an fp16 scale per row, against 2 bytes per weight (rANS comes within ~0.1 % of
that entropy; the artifact's lzma then takes off what it can from either).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import paired_test as pt  # noqa: E402
import train_gpt as tg  # noqa: E402


def entropy_bytes(q: torch.Tensor) -> float:
    counts = torch.bincount((q.flatten() - q.min()).long()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum()) * q.numel() / 8


def requantize(model: tg.GPT, names: list[str], bits: int) -> dict:
    """Replace each named tensor by its int-`bits` per-row round trip; returns bytes before and after."""
    params, out = dict(model.named_parameters()), {}
    for n in names:
        if n not in params or params[n].ndim != 2:
            tables = ", ".join(k for k, v in params.items() if v.ndim == 2 and "blocks" not in k)
            raise SystemExit(f"error: {n} is not a 2-D tensor of the model (outside the blocks: {tables})")
        w = params[n].data
        q, s = tg.quantize_rows(w, 2 ** bits)
        with torch.no_grad():
            w.copy_(tg.dequantize_rows(q, s, 2 ** bits))
        out[n] = (2 * w.numel(), entropy_bytes(q) + 2 * w.shape[0])
    return out


def score_model(name: str, model: tg.GPT, val, cfg, d, out: str | None) -> np.ndarray:
    """Per-target NLL over the round trip's windows; printed as bpb, saved as OUT/NAME.npy if OUT is given."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        sc = tg.Scorer(model.eval(), val, cfg, d, cfg.eval_seq_len, cfg.eval_seq_len)
        nll = sc.score(0, len(sc.ends))
    print(f"{name}: {val.n} targets, bpb {nll.sum() / (math.log(2) * val.bytes.sum()):.5f}, "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        np.save(Path(out) / f"{name}.npy", nll)
    return nll


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--tensors", default="tok_emb.weight")
    ap.add_argument("--targets", type=int, default=0, help="score the first N val targets (0: all)")
    ap.add_argument("--out", help="folder for the two NLL dumps")
    ap.add_argument("--base-nll", help="the unchanged artifact's NLL dump of an earlier probe (same targets): not scored again")
    args = ap.parse_args(argv)
    data, tok = os.environ.get("DATA_PATH"), os.environ.get("TOKENIZER_PATH")
    if not (data and tok and Path(data).is_dir() and Path(tok).is_file()):
        sys.exit("error: set DATA_PATH (a folder with the val shard) and TOKENIZER_PATH (a file)")
    if not 2 <= args.bits <= 8:
        sys.exit("error: --bits must be in 2..8")
    try:
        base, cfg = tg.load_artifact(args.artifact, torch.device("cpu"))
    except tg.InputError as e:
        sys.exit(f"error: {e}")
    probe = copy.deepcopy(base)
    sizes = requantize(probe, [n.strip() for n in args.tensors.split(",") if n.strip()], args.bits)
    cfg.data_path, cfg.tokenizer_path = data, tok
    tokens = tg.load_val_tokens(cfg)
    if args.targets:
        tokens = tokens[:args.targets + 1]
    val, d = tg.ValData(cfg, tokens=tokens), tg.Dist(0, 1, torch.device("cpu"))
    nll = {}
    if args.base_nll:
        nll["base"] = np.load(args.base_nll)
        if nll["base"].shape != (val.n,):
            sys.exit(f"error: {args.base_nll} holds {nll['base'].shape[0]} targets, not {val.n}")
    for name, model in (("base", base), ("probe", probe)):
        if name in nll:
            continue
        nll[name] = score_model(name, model, val, cfg, d, args.out)
    for n, (before, after) in sizes.items():
        print(f"{n}: int{args.bits} per row ~{after:,.0f} B (entropy + scales) vs fp16 {before:,} B: saves ~{before - after:,.0f} B")
    r = pt.paired(nll["probe"], nll["base"], val.bytes, pt.unit_ids(val.tokens, val.n, "doc", 0))
    print(pt.report(r, f"int{args.bits}", "fp16"))


if __name__ == "__main__":
    main()
