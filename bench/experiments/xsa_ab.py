"""A/B in one process, alternating: XSA through F.normalize (train_gpt.xsa) vs one projection coefficient
(y.v)/(v.v) computed in fp32.    python bench/experiments/xsa_ab.py   (proxy shards in .proxy)"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_train import setup, tg, train_step_fn  # noqa: E402

d, cfg, model, fwd0, opt, loader = setup("h100", ".proxy")
normalize = tg.xsa


def coef(y, v):
    vv = v.to(y.dtype).unsqueeze(3).float()
    c = (y.float() * vv).sum(-1, keepdim=True) / (vv * vv).sum(-1, keepdim=True).clamp_min(1e-24)
    return (y.float() - c * vv).to(y.dtype)


step0 = train_step_fn(fwd0, opt, loader, d)
for i in range(3):  # proj/down start at zero: move away from init so that XSA matters for the loss
    step0(i)
x, y = loader.next_step()[0]
for name, fn in (("normalize", normalize), ("coef", coef), ("normalize", normalize), ("coef", coef)):
    tg.xsa = fn
    torch._dynamo.reset()
    fwd = torch.compile(model, dynamic=False, fullgraph=True)
    with torch.no_grad(), tg.autocast(d):
        loss = fwd(x, y).item()
    step = train_step_fn(fwd, opt, loader, d)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(2):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(6):
        step(2 + i)
    torch.cuda.synchronize()
    model.load_state_dict(snap)
    print(f"xsa {name}: {(time.perf_counter() - t0) / 6 * 1000:.1f} ms/step  loss on a fixed batch {loss:.6f}", flush=True)
