"""Score A/B: arms x seeds of train_gpt.py in one call, then a table with paired tests against the first arm.

  python bench/score_ab.py --out DIR --seconds 120 --seeds 1337,1338 \\
      --arm base=WARMUP_BY_CLOCK=1 --arm int4up=WARMUP_BY_CLOCK=1,MLP_UP_ALPHABET=16 \\
      [--eval-arm ctx2048@base=EVAL_SEQ_LEN=2048] [--preset h100] [--budget-s 560]
  python bench/score_ab.py --report DIR [DIR ...]      # the table again, from run folders already written

An arm is NAME=K=V,K=V (environment overrides of Config fields; empty after '=' for none). Each run writes
DIR/arms.txt (the arms in order: the table's first is the reference) and DIR/NAME_sSEED/ (train.log, submission.json, nll.npy: the score mode's per-target NLL). An eval arm
NAME@ARM=K=V re-evaluates ARM's artifacts with other eval settings (--eval-only): no training. Runs go in
order arm by arm within a seed, seed by seed; one that would not finish inside --budget-s (judged by the
slowest run so far) is skipped and listed, and so is one whose folder already holds its log (run again to finish
a plan). --slim deletes what a finished run's folder holds beyond its results (model.pt, checkpoints, the .out
copy of its log; a failed run keeps all): a GPU call's output folder comes back only with few, small files.
Needs DATA_PATH and TOKENIZER_PATH in the environment.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paired_test as pt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_arm(text: str, eval_arm: bool = False) -> tuple[str, str | None, dict]:
    name, sep, body = text.partition("=")
    base = None
    if eval_arm:
        name, at, base = name.partition("@")
        if not at or not NAME.match(base):
            raise ValueError(f"eval arm {text!r}: expected NAME@ARM=K=V,...")
    if not sep or not NAME.match(name):
        raise ValueError(f"arm {text!r}: expected NAME=K=V,... (NAME of letters, digits, _ . -)")
    env = {}
    for kv in filter(None, body.split(",")):
        k, eq, v = kv.partition("=")
        if not eq or not re.match(r"^[A-Z_][A-Z0-9_]*$", k):
            raise ValueError(f"arm {name}: {kv!r} is not KEY=VALUE with an upper-case key")
        env[k] = v
    return name, base, env


def run_one(cmd: list[str], env: dict, run_dir: Path, log_name: str) -> tuple[int, float]:
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(run_dir / f"{log_name}.out", "w") as out:
        rc = subprocess.call(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    return rc, time.time() - t0


def slim(run_dir: Path, kind: str) -> None:
    for p in [run_dir / "model.pt", run_dir / f"{kind}.out", *run_dir.glob("ckpt_step*.pt")]:
        p.unlink(missing_ok=True)


def load_run(d: Path) -> dict | None:
    """A finished run's numbers, read from its log (train.log, or eval.log of an --eval-only run)."""
    log = d / "train.log" if (d / "train.log").is_file() else d / "eval.log"
    if not log.is_file():
        return None
    text = log.read_text()
    modes = {m: float(v) for m, v in re.findall(r"^final_(\w+) val_loss:\S+ val_bpb:(\S+)", text, re.M)}
    primary = next((m for m in ("ttt", "slot_causal", "sliding") if m in modes), None)
    if primary is None:
        return None
    size = re.search(r"^size: .*total:(\d+)", text, re.M)
    steps = re.search(r"^stopped step:(\d+)", text, re.M)
    return {"dir": d, "score": modes[primary], "sliding": modes.get("sliding"), "modes": modes,
            "bytes": int(size.group(1)) if size else None, "steps": int(steps.group(1)) if steps else None,
            "nll": d / "nll.npy" if (d / "nll.npy").is_file() else None}


def table(dirs: list[Path], data_path: str | None, tokenizer_path: str | None) -> str:
    runs: dict[str, dict[int, dict]] = {}
    for d in dirs:
        for sub in sorted(p for p in d.iterdir() if p.is_dir()):
            m = re.match(r"^(.+)_s(\d+)$", sub.name)
            r = load_run(sub) if m else None
            if r:
                runs.setdefault(m.group(1), {})[int(m.group(2))] = r
    if not runs:
        return "no finished runs"
    order = [n for d in dirs if (d / "arms.txt").is_file() for n in (d / "arms.txt").read_text().split()]
    arms = sorted(runs, key=lambda a: (order.index(a) if a in order else len(order), a))
    ref = arms[0]
    lines = [f"{'arm':<16}{'seed':>6}{'steps':>7}{'bytes':>11}{'sliding':>10}{'score':>10}{'d_score':>10}"]
    for a in arms:
        for s, r in sorted(runs[a].items()):
            base = runs[ref].get(s)
            dd = f"{r['score'] - base['score']:+.5f}" if base and a != ref else ""
            lines.append(f"{a:<16}{s:>6}{r['steps'] or '':>7}{r['bytes'] or '':>11}"
                         f"{r['sliding'] or float('nan'):>10.5f}{r['score']:>10.5f}{dd:>10}")
    lines.append("")
    lines.append(f"{'arm':<16}{'n':>3}{'mean':>10}{'sd':>9}{'d_mean':>10}  Welch one-sided p (arm < {ref})")
    ref_scores = [r["score"] for r in runs[ref].values()]
    for a in arms:
        sc = [r["score"] for r in runs[a].values()]
        sd = float(np.std(sc, ddof=1)) if len(sc) > 1 else float("nan")
        p = ""
        if a != ref and len(sc) > 1 and len(ref_scores) > 1:
            p = f"{pt.welch_one_sided(sc, ref_scores)['p_one_sided']:.3g}"
        lines.append(f"{a:<16}{len(sc):>3}{np.mean(sc):>10.5f}{sd:>9.5f}{np.mean(sc) - np.mean(ref_scores):>+10.5f}  {p}")
    if data_path and tokenizer_path:
        val = None
        lines.append("")
        lines.append(f"paired per-target test of the score mode, by document, against {ref} (negative: arm better)")
        for a in arms[1:]:
            for s, r in sorted(runs[a].items()):
                base = runs[ref].get(s)
                if not (base and base["nll"] and r["nll"]):
                    continue
                val = val or pt.val_stream(data_path, tokenizer_path)
                res = pt.paired(np.load(r["nll"]), np.load(base["nll"]), val.bytes,
                                pt.unit_ids(val.tokens, val.n, "doc", 0))
                lines.append(f"  {a} s{s}: " + pt.report(res, a, ref))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for the run folders")
    ap.add_argument("--arm", action="append", default=[], help="NAME=K=V,... (first arm: the reference)")
    ap.add_argument("--eval-arm", action="append", default=[], help="NAME@ARM=K=V,...: re-evaluate ARM's artifacts")
    ap.add_argument("--seeds", default="1337")
    ap.add_argument("--seconds", type=float, default=120.0, help="training clock per run (MAX_WALLCLOCK_SECONDS)")
    ap.add_argument("--preset", default="h100")
    ap.add_argument("--budget-s", type=float, default=math.inf, help="skip runs that would end after this")
    ap.add_argument("--report", nargs="+", metavar="DIR", help="only print the table of these folders")
    ap.add_argument("--slim", action="store_true", help="keep only a finished run's results (log, NLL, artifact, json)")
    args = ap.parse_args(argv)
    data, tok = os.environ.get("DATA_PATH"), os.environ.get("TOKENIZER_PATH")
    if args.report:
        missing = [d for d in args.report if not Path(d).is_dir()]
        if missing:
            sys.exit(f"error: no such folder: {', '.join(missing)}")
        print(table([Path(d) for d in args.report], data, tok))
        return
    try:
        arms = [parse_arm(a) for a in args.arm]
        evals = [parse_arm(a, eval_arm=True) for a in args.eval_arm]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as e:
        sys.exit(f"error: {e}")
    names = [a[0] for a in arms] + [e[0] for e in evals]
    if not arms or not args.out:
        sys.exit("error: need --out and at least one --arm")
    if len(set(names)) != len(names) or any(e[1] not in names for e in evals):
        sys.exit("error: arm names must be unique and every eval arm must name a training arm")
    if not (data and tok and Path(data).is_dir() and Path(tok).is_file()):
        sys.exit("error: set DATA_PATH (a folder) and TOKENIZER_PATH (a file)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    known = (out / "arms.txt").read_text().split() if (out / "arms.txt").is_file() else []
    (out / "arms.txt").write_text(" ".join(known + [n for n in names if n not in known]) + "\n")  # table order
    t_start, slowest, skipped = time.time(), {"train": 0.0, "eval": 60.0}, []  # eval: until one is timed
    plan = [(s, "train", a) for s in seeds for a in arms] + [(s, "eval", e) for s in seeds for e in evals]
    for i, (seed, kind, (name, base, env)) in enumerate(plan):
        run_dir = out / f"{name}_s{seed}"
        if (run_dir / f"{kind}.log").is_file():  # train_gpt.py refuses a run folder that holds a run
            skipped.append(f"{run_dir.name} (already run)")
            continue
        if time.time() - t_start + slowest[kind] > args.budget_s:
            skipped.append(run_dir.name)
            continue
        common = {"SEED": str(seed), "RUN_DIR": str(run_dir.resolve()), "MAX_WALLCLOCK_SECONDS": str(args.seconds)}
        cmd = [sys.executable, "train_gpt.py", "--preset", args.preset, "--save-nll", str((run_dir / "nll.npy").resolve())]
        if kind == "eval":
            base_env = next(a[2] for a in arms if a[0] == base)
            art = out / f"{base}_s{seed}" / "model.hqa"
            if not art.is_file():
                skipped.append(f"{run_dir.name} (no artifact {art})")
                continue
            env = {**base_env, **env}
            cmd += ["--eval-only", str(art.resolve())]
        rc, secs = run_one(cmd, {**env, **common}, run_dir, kind)
        if args.slim and rc == 0:
            slim(run_dir, kind)
        slowest[kind] = max(slowest[kind], secs)
        r = load_run(run_dir) if kind == "train" else None
        print(f"[{i + 1}/{len(plan)}] {run_dir.name} rc:{rc} {secs:.0f}s "
              + (f"score:{r['score']:.5f}" if r else "") + f" elapsed:{time.time() - t_start:.0f}s", flush=True)
    if skipped:
        print("skipped (budget, missing input or already run): " + ", ".join(skipped))
    print(table([out], data, tok))


if __name__ == "__main__":
    main()
