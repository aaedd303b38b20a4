"""Training throughput per preset: compile seconds, steady-state ms/step, tokens/s, FLOPs/token, utilization,
peak memory; the paths below side by side in one process:
  compiled   what train_gpt.py runs: torch.compile, bf16 residual stream, the fused kernels of fused_kernels.py
  triton-mlp the same with Triton's MLP kernels instead of CUTLASS's on Hopper (CUTLASS_MLP=0)
  unfused    the same without those kernels (FUSED_KERNELS=0)
  mb48       the same with micro-batches of 48 sequences (MICRO_BATCH_SEQS=48; the default is up to 128)
  eager      the plain path: no torch.compile, no fused kernels, micro-batches of 48

    python bench/bench_train.py --data-path .proxy --presets h100,3090 --steps 6
Environment variables override preset fields as in train_gpt.py (e.g. MICRO_BATCH_SEQS=24).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fused_kernels  # noqa: E402
import train_gpt as tg  # noqa: E402


def flops_per_token(cfg: tg.Config, model: tg.GPT) -> float:
    """6 x (matmul weights incl. the tied output head) + causal attention 6*L*T*d (fwd+bwd)."""
    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, (tg.QATLinear, torch.nn.Linear)))
    lin += cfg.vocab_size * cfg.model_dim
    return 6 * lin + 6 * cfg.num_layers * cfg.train_seq_len * cfg.model_dim


def train_step_fn(fwd, opt, loader, d):
    """One optimizer step at full lr (the schedule does not change the cost); returns the mean micro-loss."""
    def step(i):
        loss = tg.forward_backward(fwd, loader.next_step(), d)
        opt.step(i, 1.0)
        opt.zero_grad()
        return loss
    return step


def setup(preset: str, data_path: str, compile_mode: str | None = None, **flags):
    """A model from the preset's seed, its forward (compiled if cfg.compile, in torch.compile mode
    `compile_mode`), optimizer and loader. `flags` override Config fields as train_gpt's flags do, except
    micro_batch_seqs, which only caps the preset's (the plain paths' 48 must not raise the 3090's 16)."""
    d = tg.Dist(0, 1, torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if "micro_batch_seqs" in flags:
        preset_mb = tg.build_config(preset, {"data_path": data_path}).micro_batch_seqs
        flags["micro_batch_seqs"] = min(flags["micro_batch_seqs"], preset_mb)
    cfg = tg.build_config(preset, {"data_path": data_path, **flags})
    fused_kernels.cutlass_lib = None
    if cfg.fused_kernels and cfg.cutlass_mlp:
        print(f"{preset} cutlass_mlp:{fused_kernels.enable_cutlass_mlp(d.device)}", flush=True)
    print(f"{preset} inductor:{fused_kernels.tune_inductor(d.device)}", flush=True)
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg).to(d.device)
    fwd = torch.compile(model, dynamic=False, fullgraph=True, mode=compile_mode) if cfg.compile else model
    return d, cfg, model, fwd, tg.Optimizers(model, cfg, d), tg.TrainLoader(cfg, d)


PATHS = {"compiled": {}, "triton-mlp": dict(cutlass_mlp=0), "unfused": dict(fused_kernels=0), "mb48": dict(micro_batch_seqs=48),
         "eager": dict(compile=0, fused_kernels=0, micro_batch_seqs=48)}


def bench(preset: str, path: str, steps: int, data_path: str, peak_tflops: float) -> dict:
    d, cfg, model, fwd, opt, loader = setup(preset, data_path, **PATHS[path])
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    step = train_step_fn(fwd, opt, loader, d)
    t0 = time.perf_counter()
    for i in range(2):  # first step compiles, second settles the allocator
        step(i)
    tg.sync(d)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(2 + i)
    tg.sync(d)
    dt = (time.perf_counter() - t0) / steps
    tps = cfg.train_batch_tokens / dt
    fpt = flops_per_token(cfg, model)
    return {"preset": preset, "path": path, "warm_s": warm, "ms_step": dt * 1000,
            "tok_s": tps, "gflop_tok": fpt / 1e9, "util": fpt * tps / (peak_tflops * 1e12),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if d.device.type == "cuda" else float("nan"),
            "loss": loss.item(), "grad_accum": loader.accum}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-path", default="./data/datasets/fineweb_tiny_sp1024")
    ap.add_argument("--presets", default="h100,3090")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--paths", default="compiled,unfused,mb48,eager", help=",".join(PATHS))
    ap.add_argument("--peak-tflops", type=float, default=800.0, help="bf16 dense peak used for utilization")
    a = ap.parse_args()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"device:{dev} torch:{torch.__version__} attention:{'fa3' if fused_kernels.fa3_attn else 'sdpa'} steps:{a.steps}")
    rows = []
    for p in a.presets.split(","):
        for path in a.paths.split(","):
            rows.append(bench(p, path, a.steps, a.data_path, a.peak_tflops))
            r = rows[-1]
            print(f"  done {p}/{r['path']}: {r['ms_step']:.1f} ms/step", flush=True)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(f"| preset | path | grad_accum | warm-up s (compile) | ms/step | tokens/s | GFLOP/token | util vs {a.peak_tflops:.0f} TFLOP/s | peak GiB | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['path']} | {r['grad_accum']} | {r['warm_s']:.1f} | {r['ms_step']:.1f} | {r['tok_s'] / 1e6:.3f} M | "
              f"{r['gflop_tok']:.3f} | {100 * r['util']:.1f}% | {r['peak_gib']:.2f} | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
