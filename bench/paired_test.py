"""Significance of a val_bpb difference: paired per-target (two --save-nll dumps of one val stream) and over seeds.

  python bench/paired_test.py A.npy B.npy --data-path DIR --tokenizer-path TOK [--unit doc|block] [--block 2048]

Neighbouring targets are correlated (one document is easy, the next hard), so the pairs are units of
targets, not targets: documents (split at BOS) by default, or fixed blocks. Each unit u contributes
D_u = sum over its targets of (nll_A - nll_B) in nats; the bpb difference is sum_u D_u / (ln 2 * bytes), and
its standard error comes from the spread of D_u over units (Student t, units - 1 degrees of freedom).
Negative = A is better. The seed-level test is the challenge's: one-sided Welch t over per-seed scores.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def reg_inc_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lb = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lb) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lb) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, dof: float) -> float:
    """P(T > t) for Student's t with dof degrees of freedom."""
    tail = 0.5 * reg_inc_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return tail if t > 0 else 1.0 - tail


def t_quantile(p: float, dof: float) -> float:
    """The t with P(T <= t) = p (bisection; p in (0, 1))."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if 1.0 - t_sf(mid, dof) < p else (lo, mid)
    return 0.5 * (lo + hi)


def unit_ids(tokens: np.ndarray, n_targets: int, unit: str, block: int, bos: int = 1) -> np.ndarray:
    """Unit index of every target (target j is token j+1): its document (a BOS token starts one) or block."""
    if unit == "block":
        return np.arange(n_targets) // block
    return np.cumsum(tokens[1:n_targets + 1] == bos)


def paired(nll_a: np.ndarray, nll_b: np.ndarray, nbytes: np.ndarray, units: np.ndarray) -> dict:
    if nll_a.shape != nll_b.shape or nll_a.shape != nbytes.shape:
        raise ValueError(f"dumps and val stream differ in length: {nll_a.shape}, {nll_b.shape}, {nbytes.shape}")
    scale = 1.0 / (math.log(2) * float(nbytes.sum()))
    d_u = np.bincount(units - units.min(), weights=nll_a - nll_b)
    n = len(d_u)
    delta = float(d_u.sum()) * scale
    se = float(d_u.std(ddof=1)) * math.sqrt(n) * scale if n > 1 else math.inf
    if n < 2:
        p = 1.0
    elif se > 0:
        p = 2 * t_sf(abs(delta / se), n - 1)
    else:  # every unit moved by the same amount
        p = 0.0 if delta != 0 else 1.0
    half = t_quantile(0.975, n - 1) * se if n > 1 else math.inf
    return {"bpb_a": float(nll_a.sum()) * scale, "bpb_b": float(nll_b.sum()) * scale, "delta": delta, "se": se,
            "ci95": (delta - half, delta + half), "p_two_sided": p,
            "units": n, "a_better_units": int((d_u < 0).sum())}


def welch_one_sided(a: list[float], b: list[float]) -> dict:
    """H1: mean(a) < mean(b) (a scores lower bpb). The challenge's test for a record over seeds."""
    na, nb = len(a), len(b)
    ma, mb = float(np.mean(a)), float(np.mean(b))
    va, vb = float(np.var(a, ddof=1)) / na, float(np.var(b, ddof=1)) / nb
    se = math.sqrt(va + vb)
    if se == 0:
        return {"delta": ma - mb, "t": -math.inf if ma < mb else math.inf, "dof": float(na + nb - 2),
                "p_one_sided": 0.0 if ma < mb else 1.0}
    dof = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    t = (ma - mb) / se
    return {"delta": ma - mb, "t": t, "dof": dof, "p_one_sided": 1.0 - t_sf(t, dof)}


def val_stream(data_path: str, tokenizer_path: str, vocab_size: int = 1024):
    import train_gpt as tg
    cfg = tg.Config(data_path=data_path, tokenizer_path=tokenizer_path, vocab_size=vocab_size)
    return tg.ValData(cfg)


def report(r: dict, name_a: str = "A", name_b: str = "B") -> str:
    lo, hi = r["ci95"]
    return (f"{name_a} {r['bpb_a']:.5f} vs {name_b} {r['bpb_b']:.5f}: delta {r['delta']:+.5f} bpb "
            f"(95% CI {lo:+.5f} .. {hi:+.5f}, se {r['se']:.5f}, p={r['p_two_sided']:.2g}, "
            f"{r['units']} units, {name_a} better in {r['a_better_units']})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--data-path", required=True, help="folder with the val shard the dumps scored")
    ap.add_argument("--tokenizer-path", required=True)
    ap.add_argument("--unit", choices=("doc", "block"), default="doc")
    ap.add_argument("--block", type=int, default=2048, help="targets per block (--unit block)")
    args = ap.parse_args(argv)
    for p in (args.a, args.b):
        if not Path(p).is_file():
            sys.exit(f"error: {p}: no such file")
    if args.block < 1:
        sys.exit("error: --block must be positive")
    val = val_stream(args.data_path, args.tokenizer_path)
    a, b = np.load(args.a), np.load(args.b)
    try:
        r = paired(a, b, val.bytes, unit_ids(val.tokens, val.n, args.unit, args.block))
    except ValueError as e:
        sys.exit(f"error: {e}")
    name = lambda p: Path(p).parent.name if Path(p).stem == "nll" else Path(p).stem  # noqa: E731  run folder's name
    print(report(r, name(args.a), name(args.b)))


if __name__ == "__main__":
    main()
