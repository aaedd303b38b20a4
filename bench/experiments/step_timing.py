"""Is the h100 step GPU-bound? bench_train's async 8-step mean against the same steps each synchronized, the host's
enqueue time per step (step() returning, without a sync), and the SM clock / power the driver reports while it runs.
    python bench/experiments/step_timing.py --data-path .proxy"""
import argparse
import os
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_train import setup, train_step_fn  # noqa: E402


def sample_clocks(stop, out):
    while not stop.is_set():
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active",
                                "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            out.append((time.perf_counter(), r.stdout.strip()))
        except Exception as e:
            out.append((time.perf_counter(), f"nvidia-smi failed: {e}"))
            return
        time.sleep(0.2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-path", default=".proxy")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    d, cfg, model, fwd, opt, loader = setup("h100", a.data_path)
    step = train_step_fn(fwd, opt, loader, d)
    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    clocks, stop = [], threading.Event()
    th = threading.Thread(target=sample_clocks, args=(stop, clocks), daemon=True)
    th.start()
    for rnd in range(2):
        t0 = time.perf_counter()
        enq = []
        for i in range(a.steps):
            t = time.perf_counter()
            step(10 + i)
            enq.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        async_ms = (time.perf_counter() - t0) / a.steps * 1000
        synced = []
        for i in range(a.steps):
            t = time.perf_counter()
            step(20 + i)
            torch.cuda.synchronize()
            synced.append((time.perf_counter() - t) * 1000)
        print(f"round {rnd}: async mean {async_ms:.1f} ms/step; host enqueue per step (ms): "
              + " ".join(f"{1000 * e:.0f}" for e in enq))
        print("  synced per step (ms): " + " ".join(f"{s:.1f}" for s in synced) + f"  mean {sum(synced) / len(synced):.1f}")
    stop.set()
    th.join()
    print("nvidia-smi samples (sm MHz, W, C, throttle reasons):")
    t0 = clocks[0][0] if clocks else 0
    for t, s in clocks[:: max(1, len(clocks) // 25)]:
        print(f"  {t - t0:6.1f}s {s}")


if __name__ == "__main__":
    main()
