"""Micro-batches on two CUDA streams, so that one's forward could run beside the previous one's backward (each
backward waits for the one before, so gradients accumulate in the same order). Patches train_gpt.forward_backward
and runs bench_train with the rest of the command line.
    python bench/experiments/mb_streams.py --data-path .proxy --presets h100 --steps 8 --paths compiled
Measured in session 7 (the same function, then in train_gpt.py behind MB_STREAMS=1): 801.3 vs 622.7 ms/step,
peak memory unchanged (no second micro-batch was ever in flight), so not adopted
(logs/dev/2026-11-24_h100x1_s7_streams_*.txt)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import bench_train  # noqa: E402
import train_gpt as tg  # noqa: E402

STREAMS: dict = {}


def forward_backward_streams(fwd, batches: list, d: tg.Dist) -> torch.Tensor:
    main = torch.cuda.current_stream(d.device)
    streams = STREAMS.setdefault(d.device, (torch.cuda.Stream(d.device), torch.cuda.Stream(d.device)))
    for s in streams:
        s.wait_stream(main)
    losses, done = [], None
    for i, (x, y) in enumerate(batches):
        s = streams[i % 2]
        x.record_stream(s), y.record_stream(s)
        with torch.cuda.stream(s):
            with tg.autocast(d):
                loss = fwd(x, y)
            if done is not None:
                s.wait_event(done)
            (loss / len(batches)).backward()
            done = torch.cuda.Event()
            done.record(s)
            losses.append(loss.detach())
    for s in streams:
        main.wait_stream(s)
    for t in losses:
        t.record_stream(main)
    return torch.stack(losses).mean()


if __name__ == "__main__":
    tg.forward_backward = forward_backward_streams
    bench_train.main()
