"""Hand-written fused MLP kernels (fused_kernels.mlp_act_mm_kernel) against cuBLAS + inductor's elementwise kernel,
at the h100 micro-batch shape (98,304 tokens, 512 -> 2048 -> 512, bf16), in one process:
  1. block-size sweep of the kernel in both modes (up-projection + activation; hidden gradient) vs the unfused pair,
     and of a persistent variant (one program per SM looping over tiles, so a tile's epilogue can overlap the
     next tile's loads); each time is the mean over 10 back-to-back launches
  2. one MLP forward+backward, compiled, unfused vs FusedMLP; errors of each vs an fp32 reference
    python bench/experiments/fused_mlp.py [--tokens 196608] [--configs "64,128,64,4,3;128,128,64,4,2"]
                                          [--kinds tiled,persistent] [--skip-compiled]
(--configs: BLOCK_M,BLOCK_N,BLOCK_K,warps,stages;... in place of the built-in sweep, for each of --kinds;
kinds: fused_kernels' kernel with one program per tile (tiled) or one per SM, its tile loop flattened (persistent),
or N per SM (persistentN, e.g. persistent2).)"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import fused_kernels as fk  # noqa: E402
from mlp_fusion import timed  # noqa: E402

SWEEP = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 64, 8, 4),
         (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (128, 256, 32, 8, 4), (256, 128, 32, 8, 4)]


def launch(kind, a, b, h, out, grad, blocks):
    """fused_kernels' MLP kernel with these blocks: one program per tile (tiled), one per SM (persistent), or
    N per SM (persistentN: resident programs overlap one's epilogue with another's matmul)."""
    if kind in ("tiled", "persistent"):
        return fk.launch_mlp_kernel(a, b, h, out, grad, {**blocks, "PERSISTENT": kind == "persistent"})
    (M, K), N = a.shape, b.size(1)
    per_sm = int(kind.removeprefix("persistent"))
    programs = min((M // blocks["BLOCK_M"]) * (N // blocks["BLOCK_N"]),
                   per_sm * torch.cuda.get_device_properties(a.device).multi_processor_count)
    fk.mlp_act_mm_kernel[(programs,)](a, b, h, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                      GRAD=grad, PERSISTENT=True, INTERPRET=False, **blocks)


def timed10(fn):
    return timed(lambda: [fn() for _ in range(10)]) / 10


def act(h):
    return F.leaky_relu(h, 0.5).square()


def act_grad(g, h):  # what autograd computes for act, given the gradient at its output
    h = h.detach().requires_grad_()
    return torch.autograd.grad(act(h), h, g)[0]


def act_grad_formula(g, h):  # the same values as act_grad, without autograd's overhead, for timing
    return (g.float() * h.float() * torch.where(h > 0, 2.0, 0.5)).to(h.dtype)


def plain_mlp(x, w_up, w_down):
    return F.linear(act(F.linear(x, w_up)), w_down)


def fused_mlp(x, w_up, w_down):
    return fk.FusedMLP.apply(x, w_up, w_down)


def mlp_tensors(M, D=512, H=2048, dt=torch.bfloat16):
    """Seeded MLP operands at M tokens: input, both weights, an output gradient, and the hidden h."""
    torch.manual_seed(0)
    x = torch.randn(M, D, device="cuda", dtype=dt)
    w_up = torch.randn(H, D, device="cuda", dtype=dt) / D ** 0.5
    w_down = torch.randn(D, H, device="cuda", dtype=dt) / H ** 0.5
    g = torch.randn(M, D, device="cuda", dtype=dt)
    return x, w_up, w_down, g, F.linear(x, w_up)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=98304)
    ap.add_argument("--configs", default="")
    ap.add_argument("--kinds", default="tiled", help="with --configs: any of tiled,persistent,persistentN")
    ap.add_argument("--skip-compiled", action="store_true", help="only the kernel sweep (parts 1)")
    args = ap.parse_args()
    dt = torch.bfloat16
    x, w_up, w_down, g, h = mlp_tensors(args.tokens)
    print(f"device:{torch.cuda.get_device_name(0)} torch:{torch.__version__} triton:{fk.triton.__version__}")

    act_c, act_grad_c = torch.compile(act), torch.compile(act_grad_formula)
    mm_up = timed10(lambda: F.linear(x, w_up))
    mm_dg = timed10(lambda: g @ w_down)
    dA = g @ w_down
    el_up = timed10(lambda: act_c(h))
    el_dg = timed10(lambda: act_grad_c(dA, h))
    unf_up, unf_dg = mm_up + el_up, mm_dg + el_dg
    print(f"cuBLAS matmul alone: up {mm_up:.3f} ms, hidden-grad {mm_dg:.3f} ms; compiled elementwise alone: "
          f"act {el_up:.3f} ms, act-grad {el_dg:.3f} ms")
    ref_a, ref_dh = act(h.float()), act_grad(dA.float(), h.float())
    print("| kernel | BLOCK_M | BLOCK_N | BLOCK_K | warps | stages | up+act ms | hidden-grad ms | saved per MLP ms | err a | err dh |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    own = [tuple(map(int, c.split(","))) for c in args.configs.split(";") if c]
    runs = [(k, own) for k in args.kinds.split(",")] if own else [("tiled", SWEEP), ("persistent", SWEEP[:6])]
    for kind, sweep in runs:
        for bm, bn, bk, w, s in sweep:
            blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
            hh, a, dh = torch.empty_like(h), torch.empty_like(h), torch.empty_like(h)
            try:
                t_up = timed10(lambda: launch(kind, x, w_up.t(), hh, a, False, blocks))
                t_dg = timed10(lambda: launch(kind, g, w_down, h, dh, True, blocks))
            except Exception as e:  # e.g. out of shared memory
                print(f"| {kind} | {bm} | {bn} | {bk} | {w} | {s} | failed: {type(e).__name__} |")
                continue
            err = lambda u, r: ((u.float() - r).norm() / r.norm()).item()
            print(f"| {kind} | {bm} | {bn} | {bk} | {w} | {s} | {t_up:.3f} | {t_dg:.3f} | "
                  f"{unf_up + unf_dg - t_up - t_dg:+.3f} | {err(a, ref_a):.1e} | {err(dh, ref_dh):.1e} |", flush=True)
    blocks = {"up": fk.mlp_kernel_blocks(x.device, False), "grad": fk.mlp_kernel_blocks(x.device, True)}
    print(f"train_gpt's choice for this GPU: {blocks}; through the custom op (eager): "
          f"up+act {timed10(lambda: fk.mlp_up_act(x, w_up)):.3f} ms, hidden-grad "
          f"{timed10(lambda: fk.mlp_act_grad(g, w_down, h)):.3f} ms")

    if args.skip_compiled:
        return
    ref = None
    for name, fn in (("fp32 reference", plain_mlp), ("unfused, compiled", plain_mlp), ("FusedMLP, compiled", fused_mlp)):
        cast = torch.float32 if name.startswith("fp32") else dt
        ins = [t.detach().to(cast).clone().requires_grad_() for t in (x, w_up, w_down)]  # fresh leaves, no old .grad
        f = fn if name.startswith("fp32") else torch.compile(fn, fullgraph=True)
        out = f(*ins)
        out.backward(g.to(cast))
        res = [out.detach().float()] + [t.grad.float() for t in ins]
        for t in ins:
            t.grad = None

        def step():
            f(*ins).backward(g.to(cast))
        ms = timed(step, 20)
        del step
        if ref is None:
            ref = res
        errs = [((u - r).norm() / r.norm()).item() for u, r in zip(res, ref)]
        print(f"{name:<20} fwd+bwd {ms:.3f} ms   rel. err vs fp32 (y, dx, dw_up, dw_down): "
              + ", ".join(f"{e:.1e}" for e in errs), flush=True)


if __name__ == "__main__":
    main()
