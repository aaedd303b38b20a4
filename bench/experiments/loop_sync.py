"""Issue 5 experiment: the training loop's own step time (train_gpt.train, h100 preset, proxy shards) for the code in
DIR, from its log lines: the mean of steps 11..N, where every 10th step is logged (and so fully synchronized), as
bench/proxy_run.sh logs. Compares a loop that synchronizes after every step with one that keeps a step queued.

  python bench/experiments/loop_sync.py DIR [--steps 70]    (DIR: a copy of the repo's code, "." for the tree)"""
import argparse
import importlib
import re
import sys

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--steps", type=int, default=70)
ap.add_argument("--data-path", default=".proxy")
args = ap.parse_args()
sys.path.insert(0, args.dir)
tg = importlib.import_module("train_gpt")
cfg = tg.build_config("h100", {"data_path": args.data_path, "iterations": args.steps, "log_every": 10,
                               "max_wallclock_seconds": 0, "val_every": 0, "save_every": 0,
                               "run_dir": "/tmp/loop_sync", "warmdown_iters": args.steps // 2})
d = tg.init_dist()
lines = []


class Log(tg.Log):
    def __call__(self, msg):
        lines.append(msg)
        print(msg, flush=True)


log = Log(d, None)
tg.select_mlp_kernels(cfg, d, log)
tg.train(cfg, d, log)
t = {int(m.group(1)): float(m.group(2)) for m in (re.search(r"^step:(\d+)/\d+ .*train_time:(\d+)ms", x) for x in lines) if m}
print(f"{tg.__file__}: steps 11..{args.steps}: {(t[args.steps] - t[10]) / (args.steps - 10):.2f} ms/step")
