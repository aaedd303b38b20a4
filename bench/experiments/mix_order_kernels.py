"""Experiment: inductor's mix-order reduction kernels (a row reduction and column sums in one pass; in our step,
the RMS-norm backwards that also take several layers' resid_mix gradients and x0-gradient adds) at inductor's own
launch configuration and at others. Reads an inductor output-code file (TORCHINDUCTOR_CACHE_DIR, the step's
backward graph), launches each such kernel alone on random data, prints ms and effective bandwidth.

  python bench/experiments/mix_order_kernels.py GRAPH.py [--sweep NAME_SUFFIX]
"""
import argparse
import importlib.util
import itertools
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import timed  # noqa: E402  (mean of n calls after one warm-up)

DTYPES = {"*bf16": torch.bfloat16, "*fp32": torch.float32, "*fp16": torch.float16, "*i64": torch.int64,
          "*i32": torch.int32, "*i1": torch.bool}


def kernels(graph: Path) -> dict[str, str]:
    src = graph.read_text()
    found = re.findall(r"(\w+) = async_compile\.triton\('(\w+)', '''(.*?)'''", src, re.S)
    return {name: code for _, name, code in found if "MixOrderReductionGrid" in code}


def load(name: str, code: str):
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, name)


def make_args(tuner, code: str, device):
    """Tensors for every pointer argument: [xnumel, rnumel] where it is indexed by row and column, [xnumel] where
    by row only, a parameter vector where by column only; the workspace sized for the smallest split."""
    sig = tuner.triton_meta["signature"]
    xnumel = int(re.search(r"xnumel = (\d+)", code).group(1))
    rnumel = int(re.search(r"r0_numel = (\d+)", code).group(1))
    n_acc = len(re.findall(r"accum\d+ = tl.full", code))
    args, nbytes = [], 0
    for arg, ty in sig.items():
        if not ty.startswith("*"):
            continue
        if arg == "ws_ptr":
            args.append(torch.zeros(xnumel // 16 * n_acc * rnumel, device=device))  # RSPLIT_SIZE >= 16
            continue
        uses = re.findall(rf"{arg} \+ \(([^)]*)\)", code)
        if any(f"{rnumel}*x0" in u for u in uses):
            shape = (xnumel, rnumel)
            size = torch.empty(0, dtype=DTYPES[ty]).element_size() * xnumel * rnumel
            nbytes += size * (len(re.findall(rf"tl\.load\({arg} \+ \(r0_1 \+ {rnumel}\*x0\)", code)) +
                              len(re.findall(rf"tl\.store\({arg} \+ \(r0_1 \+ {rnumel}\*x0\)", code)))
        elif any("x0" in u for u in uses):
            shape = (xnumel,)
        else:
            offs = [int(m) for u in uses for m in re.findall(r"(\d+) \+ r0_1", u)]
            shape = (max(offs, default=0) + rnumel,)
        if DTYPES[ty] == torch.bool:
            args.append(torch.rand(shape, device=device) < 0.9)
        elif not DTYPES[ty].is_floating_point:  # token ids, for embedding gradients
            args.append(torch.randint(0, 1024, shape, device=device, dtype=DTYPES[ty]))
        else:
            t = torch.randn(shape, device=device, dtype=torch.float32)
            if len(shape) == 1 and shape[0] == xnumel:
                t = t.abs() + 0.5  # an rsqrt
            args.append(t.to(DTYPES[ty]) * (0.1 if len(shape) == 2 else 1.0))
    return args, xnumel, rnumel, n_acc, nbytes


def launch(fn, args, xnumel, rnumel, rsplit, xblock, warps, stages):
    grid = ((xnumel + rsplit - 1) // rsplit,)
    fn[grid](*args, xnumel, rnumel, XBLOCK=xblock, RSPLIT_SIZE=rsplit, NUM_STAGES=stages, num_warps=warps)


def col_sums(ws, n_acc, rnumel, xnumel, rsplit):
    g = (xnumel + rsplit - 1) // rsplit
    return ws[: n_acc * g * rnumel].view(n_acc, g, rnumel).sum(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("graph", type=Path)
    ap.add_argument("--sweep", default="", help="sweep launch configurations for the kernels whose name ends so")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--configs", default="", help="also time every kernel at these: 'RSPLIT,XBLOCK,WARPS,STAGES;...'")
    args = ap.parse_args()
    dev = torch.device("cuda")
    a, b = torch.randn(2, 262144, 512, device=dev).bfloat16()
    c = torch.empty_like(a)
    ms = timed(lambda: torch.add(a, b, out=c), n=args.iters)
    print(f"reference: a bf16 add of two 262,144 x 512 tensors, {3 * a.numel() * 2 / ms / 1e9:.2f} TB/s\n")
    del a, b, c
    print("| kernel | activation-sized loads | stores | inductor's config (RSPLIT, XBLOCK, warps, stages) | ms | TB/s |")
    print("|---|---|---|---|---|---|")
    found = kernels(args.graph)
    for name, code in found.items():
        tuner = load(name, code)
        cfg = tuner.configs[0]
        kw = cfg.kwargs
        base = (kw["RSPLIT_SIZE"], kw["XBLOCK"], cfg.num_warps, kw["NUM_STAGES"])
        targs, xnumel, rnumel, n_acc, mb = make_args(tuner, code, dev)  # mb: activation-sized bytes read + written
        big = len(set(re.findall(rf"tl\.load\((\w+) \+ \(r0_1 \+ {rnumel}\*x0\)", code)))
        n_store = len(re.findall(rf"tl\.store\(\w+ \+ \(r0_1 \+ {rnumel}\*x0\)", code))
        ms = timed(lambda: launch(tuner.fn, targs, xnumel, rnumel, *base), n=args.iters)
        print(f"| {name[-40:]} | {big} | {n_store} | {base} | {ms:.3f} | {mb / ms / 1e9:.2f} |")
        for c in [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";") if c]:
            try:
                ms = timed(lambda: launch(tuner.fn, targs, xnumel, rnumel, *c), n=args.iters)
                print(f"| | | | {c} | {ms:.3f} | {mb / ms / 1e9:.2f} |")
            except Exception as e:  # noqa: BLE001
                print(f"| | | | {c} | {type(e).__name__} | |")
        if not (args.sweep and name.endswith(args.sweep)):
            continue
        ref_in = [t.clone() for t in targs]
        launch(tuner.fn, targs, xnumel, rnumel, *base)
        ref_out = [t.clone() for t in targs]
        ref_cols = col_sums(ref_out[-1], n_acc, rnumel, xnumel, base[0])
        rows = []
        for rsplit, xblock, warps, stages in itertools.product((32, 64, 128, 256), (1, 2, 4, 8), (2, 4, 8, 16), (1, 2)):
            if xblock > rsplit:
                continue
            for t, r in zip(targs, ref_in):
                t.copy_(r)
            try:
                launch(tuner.fn, targs, xnumel, rnumel, rsplit, xblock, warps, stages)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 (out of resources and the like: report, go on)
                rows.append(((rsplit, xblock, warps, stages), float("inf"), type(e).__name__))
                continue
            same = all(torch.equal(a, b) for a, b in zip(targs[:-1], ref_out[:-1]))
            cols = col_sums(targs[-1], n_acc, rnumel, xnumel, rsplit)
            col_err = ((cols - ref_cols).abs().max() / ref_cols.abs().max()).item()
            for t, r in zip(targs, ref_in):  # the kernel updates in place: time from the same inputs each call
                t.copy_(r)
            ms = timed(lambda: launch(tuner.fn, targs, xnumel, rnumel, rsplit, xblock, warps, stages), n=args.iters)
            rows.append(((rsplit, xblock, warps, stages), ms, f"stores {'equal' if same else 'DIFFER'}, column sums {col_err:.1e}"))
        rows.sort(key=lambda r: r[1])
        print(f"\nsweep of {name[-40:]} (inductor's {base}: see above), fastest 15 and slowest 3:")
        for c, ms, note in rows[:15] + rows[-3:]:
            print(f"  {c}  {ms:.3f} ms  {mb / ms / 1e9:.2f} TB/s  {note}")


if __name__ == "__main__":
    main()
