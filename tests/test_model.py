"""Model section: size of the record model, shapes and gradients, QAT quantizers, parameter grouping,
causality, Newton-Schulz orthogonalization."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import dist1, randomize, smoke_cfg, tg

ALPHABETS = [tg.PENT, tg.INT4, tg.INT5, tg.INT6]


def tiny_cfg(tmp_path, **flags):
    return smoke_cfg(tmp_path, **flags)


# ---------------------------------------------------------------------------------------------------
# size and shapes
# ---------------------------------------------------------------------------------------------------


def test_h100_model_has_exact_parameter_count():
    cfg = tg.build_config("h100", env={})
    model = tg.GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == 32_760_946


def test_forward_backward_shapes_and_finite_grads(tmp_path):
    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    B, T = 3, 40
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    tgt = torch.randint(0, cfg.vocab_size, (B, T))
    h = model.hidden(ids)
    assert h.shape == (B, T, cfg.model_dim)
    logits = model.logits(h)
    assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == torch.float32
    assert logits.abs().max() <= cfg.logit_softcap  # tanh soft cap
    loss = model(ids, tgt)
    assert loss.shape == () and torch.isfinite(loss)
    # tiny tok_emb init (std 0.005) and zero-init output projections: near-uniform predictions
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.05
    nll = tg.nll_per_token(model, ids, tgt)
    assert nll.shape == (B, T)
    torch.testing.assert_close(nll.mean(), loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    missing = {n for n, p in model.named_parameters() if p.grad is None}
    assert missing <= {"blocks.0.attn.vr_lambda"}  # layer 0 has no value residual to mix
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.shape == p.shape and torch.isfinite(p.grad).all(), n


def test_gradients_reach_every_block_once_weights_are_nonzero(tmp_path):
    """With non-degenerate weights every parameter (except layer 0's unused lambda) gets a nonzero grad."""
    cfg = tiny_cfg(tmp_path)
    model = randomize(tg.GPT(cfg), seed=1, std=0.05)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    model(ids, ids.roll(-1, 1)).backward()
    for n, p in model.named_parameters():
        if n != "blocks.0.attn.vr_lambda":
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


# ---------------------------------------------------------------------------------------------------
# QAT quantizers
# ---------------------------------------------------------------------------------------------------


def _weights(rows=24, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    w[3] = 0.0  # an all-zero row
    w[5, :] = 1e-7  # a (nearly) constant row
    return w


@pytest.mark.parametrize("alphabet", ALPHABETS)
def test_quantize_rows_alphabet(alphabet):
    w = _weights(seed=alphabet)
    q, s = tg.quantize_rows(w, alphabet)
    assert q.shape == w.shape and s.shape == (w.shape[0], 1) and s.dtype == torch.float16
    assert torch.equal(q, q.round())  # integer levels
    if alphabet == tg.PENT:
        assert set(q.unique().tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0}
        assert set(q.unique().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}  # all five used on Gaussian rows
    else:
        h = alphabet // 2
        assert q.min() >= -h and q.max() <= h - 1
        assert q.min() == -h or q.max() == h - 1  # the range is actually used
    sym = q + alphabet // 2
    assert sym.min() >= 0 and sym.max() < alphabet
    assert torch.equal(sym.to(torch.uint8).float(), sym)  # what build_artifact stores
    deq = tg.dequantize_rows(q, s, alphabet)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[3], torch.zeros_like(deq[3]))  # zero row stays zero
    if alphabet != tg.PENT:  # round-to-nearest: error <= one step (the clamped top level), fp16 scale slack
        step = s.float() / (alphabet // 2)
        assert ((deq - w).abs() <= step + s.float() * 1e-3 + 1e-6).all()  # fp16 scale: rel. error < 1e-3
        assert ((deq - w).abs() <= step / 2 + s.float() * 1e-3 + 1e-6).float().mean() > 0.95  # mostly rounded
    else:
        signs_ok = (torch.sign(q) == 0) | (torch.sign(q) == torch.sign(w))
        assert signs_ok.all()


def test_pentanary_thresholds_and_ls_scale():
    w = torch.tensor([[0.0, 0.5, -0.75, 1.2, -2.0, 3.0]])
    mu = w.abs().mean()  # 1.2417
    q, s = tg.quantize_rows(w, tg.PENT)
    exp = torch.sign(w) * ((w.abs() > 0.7 * mu).float() + (w.abs() > 1.4 * mu).float())
    assert torch.equal(q, exp)
    assert q.tolist() == [[0.0, 0.0, 0.0, 1.0, -2.0, 2.0]]
    ls = (w * q).sum() / (q * q).sum()  # least-squares scale for the chosen levels
    assert torch.equal(s, ls.reshape(1, 1).half())


@pytest.mark.parametrize("alphabet", ALPHABETS)
def test_qatlinear_forward_is_dequantized_linear_and_grad_is_straight_through(alphabet):
    torch.manual_seed(alphabet)
    lin = tg.QATLinear(48, 20, alphabet)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(20, 48) * 0.3)
    assert lin.alphabet == alphabet and lin.quantized
    x = torch.randn(5, 7, 48, requires_grad=True)
    y = lin(x)
    gy = torch.randn_like(y)
    y.backward(gy)

    deq = tg.dequantize_rows(*tg.quantize_rows(lin.weight.detach(), alphabet), alphabet)
    assert not torch.equal(deq, lin.weight.detach())  # quantization really changes the weight
    w_ref = deq.clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w_ref)
    y_ref.backward(gy)
    assert torch.equal(y, y_ref)
    assert torch.equal(lin.weight.grad, w_ref.grad)  # straight-through estimator
    assert torch.equal(x.grad, x_ref.grad)

    lin.quantized = False  # artifact weights are already dequantized: plain linear
    assert torch.equal(lin(x.detach()), F.linear(x.detach(), lin.weight))


def test_model_linears_use_the_spec_alphabets(tmp_path):
    model = tg.GPT(tiny_cfg(tmp_path))
    got = {n.split(".", 2)[2]: m.alphabet for n, m in model.named_modules()
           if isinstance(m, tg.QATLinear) and n.startswith("blocks.0.")}
    assert got == {"attn.c_q": tg.INT6, "attn.c_k": tg.INT6, "attn.c_v": tg.INT5, "attn.proj": tg.INT5,
                   "mlp.up": tg.PENT, "mlp.down": tg.INT4}
    model.set_quantized(False)
    assert not any(m.quantized for m in model.modules() if isinstance(m, tg.QATLinear))
    model.set_quantized(True)
    assert all(m.quantized for m in model.modules() if isinstance(m, tg.QATLinear))


# Runs in a child process: Triton's interpreter must be switched on before the kernels are defined.
FUSED_MLP_CHECK = r"""
import json, sys, torch
import train_gpt as tg
assert tg.TRITON_ON_CPU
calls = []
apply = tg.FusedMLP.apply
tg.FusedMLP.apply = lambda *a: calls.append(1) or apply(*a)
cfg = tg.build_config("smoke", flags=dict(model_dim=64, mlp_mult=4.0, fused_kernels=int(sys.argv[1])), env={})
torch.manual_seed(0)
mlp = tg.MLP(cfg)
torch.nn.init.normal_(mlp.up.weight, std=0.15)
torch.nn.init.normal_(mlp.down.weight, std=0.1)
x = torch.randn(2, 128, 64)
g = torch.randn(2, 128, 64)
scale = 1 + 0.5 * torch.randn(64)  # the block's mlp_scale, folded into the down weight's rows

def run(dtype, fused):  # fused=None: as FUSED_KERNELS built it
    m = mlp.to(dtype)
    m.fused = m.fused if fused is None else fused
    xi, si = x.to(dtype).requires_grad_(), scale.to(dtype).requires_grad_()
    for p in m.parameters():
        p.grad = None
    y = m(xi, si)
    y.backward(g.to(dtype))
    return [t.double() for t in (y.detach(), xi.grad, m.up.weight.grad, m.down.weight.grad, si.grad)]

got = run(torch.bfloat16, None)
n_fused = len(calls)
mlp.zero_grad(set_to_none=True)
mlp.requires_grad_(False)  # a frozen block (TTT): only the input gradient, and the same one
xf = x.bfloat16().requires_grad_()
mlp(xf, scale.bfloat16()).backward(g.bfloat16())
frozen_ok = mlp.up.weight.grad is None and torch.equal(xf.grad.double(), got[1])
mlp.requires_grad_(True)
calls.clear()
plain = run(torch.bfloat16, False)
ref = run(torch.float64, False)
err = lambda u: [((a - r).norm() / r.norm()).item() for a, r in zip(u, ref)]
print(json.dumps({"fused": err(got), "plain_bf16": err(plain), "fused_calls": n_fused, "plain_calls": len(calls),
                  "frozen_ok": frozen_ok}))
"""


def run_fused_mlp_check(fused_mlp: int) -> dict:
    import json
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(tg.Path(tg.__file__).parent)}
    out = subprocess.run([sys.executable, "-c", FUSED_MLP_CHECK, str(fused_mlp)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fused_mlp_kernels_match_the_plain_mlp():
    """The Triton kernels (run by Triton's CPU interpreter) through the real MLP module, QAT weights included:
    output and all four gradients (input, both weights, folded output scale) within bf16 rounding of an fp64 reference, like the unfused bf16 MLP.
    The interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest), hence up to ~2x its error."""
    pytest.importorskip("triton")
    r = run_fused_mlp_check(1)
    assert r["fused_calls"] == 1 and r["plain_calls"] == 0  # the fused path really ran, and only when asked
    assert r["frozen_ok"]
    for fused, plain in zip(r["fused"], r["plain_bf16"]):
        assert plain < 0.01 and fused < 0.02, r


XSA_CHECK = r"""
import json, torch
import train_gpt as tg
calls = []
apply = tg.FusedXSAProj.apply
tg.FusedXSAProj.apply = lambda *a: calls.append(1) or apply(*a)
torch.manual_seed(0)
B, T, KV, G, D, dim = 2, 48, 2, 2, 32, 128  # 96 rows: not a multiple of the kernel's 64-row blocks
y, v, gz = torch.randn(B, T, KV, G, D), torch.randn(B, T, KV, D), torch.randn(B, T, dim)
v[0, 3, 1] *= 1e-14  # |v| below F.normalize's eps: the clamped branch, whose gradient has no projection
w0, scale = torch.randn(dim, KV * G * D) / (KV * G * D) ** 0.5, 0.5 + torch.rand(dim)
proj = tg.QATLinear(KV * G * D, dim, tg.INT5)
proj.quantized = False  # the quantizer rounds bf16 and fp64 weights to different levels; tested on its own

def run(dtype, fused):
    proj.weight = torch.nn.Parameter(w0.to(dtype))
    yi, vi, si = (t.to(dtype).requires_grad_() for t in (y, v, scale))
    out = tg.xsa_proj(yi, vi, proj, si, fused)
    out.backward(gz.to(dtype))
    return [t.double() for t in (out.detach(), yi.grad, vi.grad, proj.weight.grad, si.grad)]

ref = run(torch.float64, False)
keep = torch.ones(B, T, KV, dtype=torch.bool)
keep[0, 3, 1] = False
def err(u):  # relative errors of out, grad y, grad v (normal rows), grad w, grad scale, grad v (the clamped row)
    e = [((a - r).norm() / r.norm()).item() for a, r in zip(u, ref)]
    e[2] = ((u[2][keep] - ref[2][keep]).norm() / ref[2][keep].norm()).item()
    return e + [((u[2][0, 3, 1] - ref[2][0, 3, 1]).norm() / ref[2][0, 3, 1].norm()).item()]

fused = err(run(torch.bfloat16, True))
n_fused = len(calls)
plain = err(run(torch.bfloat16, False))
# the kernels' math alone: fp32 in and out, the weight scaled as the layers pass it
proj.weight = torch.nn.Parameter(w0.clone())
w = proj.weight_as(torch.float32, scale).detach().requires_grad_()
yi, vi = y.clone().requires_grad_(), v.clone().requires_grad_()
out = apply(yi, vi, w).view(B, T, dim)
out.backward(gz)
wr = w.detach().double().requires_grad_()
yr, vr = y.double().requires_grad_(), v.double().requires_grad_()
outr = tg.xsa(yr, vr).reshape(B, T, -1) @ wr.t()
outr.backward(gz.double())
fp32 = [((a.double() - r).norm() / r.norm()).item() for a, r in
        ((out.detach(), outr.detach()), (yi.grad, yr.grad), (vi.grad[keep], vr.grad[keep]), (w.grad, wr.grad))]
print(json.dumps({"fused": fused, "plain_bf16": plain, "fused_calls": n_fused, "calls": len(calls), "fp32": fp32}))
"""


def test_fused_xsa_proj_matches_the_plain_path():
    """XSA and the output projection (Triton kernels, CPU interpreter) against xsa() + QATLinear in fp64: output
    and the gradients at y, v, the weight and the output scale, a row whose value vector is below the
    normalization's eps included; in bf16 within bf16 rounding (interpreter: ~2x, see above), and with fp32
    tensors (the kernels' math alone) within fp32 rounding."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(tg.Path(tg.__file__).parent)}
    out = subprocess.run([sys.executable, "-c", XSA_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["fused_calls"] == 1 and r["calls"] == 1  # the kernel ran, and only when asked
    for fused, plain in zip(r["fused"], r["plain_bf16"]):
        assert plain < 0.01 and fused < 0.02, r
    assert max(r["fp32"]) < 1e-5, r


ATTN_INPUTS_CHECK = r"""
import json, torch
import train_gpt as tg
torch.manual_seed(0)
B, T, H, KV, D, rope_dims = 2, 48, 4, 2, 32, 8
qkv, ve, v0 = torch.randn(B, T, (H + 2 * KV) * D), torch.randn(B, T, KV * D), torch.randn(B, T, KV, D)
gain, lam = torch.tensor([1.5, 0.7, 2.0, 1.1]), torch.tensor([0.6, 0.45])
gs = [torch.randn(B, T, n, D) for n in (H, KV, KV, KV)]  # at q, k, v and v's second use (XSA's)
cos, sin = tg.rope_tables(T, rope_dims, "cpu")

def plain(*args):  # v twice, as the fused op returns it
    q, k, v = tg.attn_inputs(*args)
    return q, k, v, v

def run(fn, dtype, with_ve, with_v0):
    ins = [t.to(dtype).clone().requires_grad_() for t in (qkv, gain, ve, v0, lam)]
    outs = fn(ins[0], cos, sin, ins[1], ins[2] if with_ve else None, *(ins[3:] if with_v0 else (None, None)), H, KV)
    sum((o * g.to(dtype)).sum() for o, g in zip(outs, gs)).backward()
    used = ins[:2] + ins[2:3] * with_ve + ins[3:] * with_v0
    return [t.double() for t in [*outs, *(i.grad for i in used)]]

res = {}
for with_ve in (True, False):
    for with_v0 in (True, False):
        ref = run(plain, torch.float64, with_ve, with_v0)
        for name, fn, dt in (("fp32", tg.FusedAttnInputs.apply, torch.float32), ("fused", tg.FusedAttnInputs.apply, torch.bfloat16),
                             ("plain_bf16", plain, torch.bfloat16)):
            u = run(fn, dt, with_ve, with_v0)
            res.setdefault(name, []).extend(((a - r).norm() / r.norm()).item() for a, r in zip(u, ref))
print(json.dumps(res))
"""


def test_fused_attn_inputs_kernel_matches_the_plain_path():
    """q/k RMSNorm + RoPE + gain and v + value embedding, mixed with v0 (Triton, CPU interpreter) against
    attn_inputs() in fp64: q, k, v and the gradients at qkv, the gains, the value embedding, v0 and the mixing
    weights, v's two uses carrying gradients of their own; with and without a value embedding, with and without
    the value residual.
    fp32 tensors check the kernel's math alone (fp32 rounding); bf16 within bf16 rounding (interpreter: ~2x)."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(tg.Path(tg.__file__).parent)}
    out = subprocess.run([sys.executable, "-c", ATTN_INPUTS_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert max(r["fp32"]) < 1e-5, r
    for fused, plain in zip(r["fused"], r["plain_bf16"]):
        assert plain < 0.02 and fused < 0.02, r  # the gain gradient sums many bf16 products: 1.3e-2 plain


MODEL_FUSED_CHECK = r"""
import json, torch
import train_gpt as tg
assert tg.TRITON_ON_CPU
calls = {}
for name in ("FusedMLP", "FusedXSAProj", "FusedAttnInputs"):
    fn = getattr(tg, name).apply
    setattr(getattr(tg, name), "apply", (lambda f, n: lambda *a: calls.__setitem__(n, calls.get(n, 0) + 1) or f(*a))(fn, name))
cfg = tg.build_config("smoke", flags=dict(train_seq_len=128), env={})
torch.manual_seed(0)
model = tg.GPT(cfg)
with torch.no_grad():  # off the zero/identity init, so that every path carries signal and gradient
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
ids = torch.randint(0, cfg.vocab_size, (2, 129))
x, y = ids[:, :-1], ids[:, 1:]

def run(fused, dtype):
    model.to(dtype)
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = fused
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
        loss = model(x, y)
    loss.backward()
    return {"loss": loss.detach().double()} | {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

ref = run(False, torch.float64)
plain = run(False, torch.float32)  # bf16 autocast: the kernels' dtype
n_plain = dict(calls)
fused = run(True, torch.float32)
err = lambda u: {n: ((u[n] - r).norm() / r.norm().clamp_min(1e-30)).item() for n, r in ref.items()}
print(json.dumps({"plain": err(plain), "fused": err(fused), "plain_calls": n_plain,
                  "fused_calls": {k: calls[k] - n_plain.get(k, 0) for k in calls}}))
"""


def test_fused_kernels_in_the_whole_model_match_the_plain_path():
    """The smoke model (4 layers: value embeddings, value residual, U-net skips) under bf16 autocast with the
    fused kernels (Triton's CPU interpreter) against the same model without them, both against fp64: the loss
    and every parameter's gradient. Matrices within about the plain path's bf16 error; every gradient, scalars
    whose sums cancel down to 1e-6 included, within 0.25 (a gradient lost or misrouted between the kernels and
    the model errs by about 1)."""
    import json
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(tg.Path(tg.__file__).parent)}
    out = subprocess.run([sys.executable, "-c", MODEL_FUSED_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["plain_calls"] == {} and r["fused_calls"] == {"FusedAttnInputs": 4, "FusedXSAProj": 4, "FusedMLP": 4}, r
    assert r["plain"].keys() == r["fused"].keys() and len(r["fused"]) > 50, r
    for name, err in r["fused"].items():
        assert err < 0.25, (name, err)
        if name == "loss" or name.endswith(".weight"):
            assert err < 2 * r["plain"][name] + 0.01, (name, err, r["plain"][name])


PERSISTENT_CHECK = r"""
import json, torch
import fused_kernels as fk
torch.manual_seed(0)
M, K, N = 96, 64, 160  # 3 x 5 = 15 tiles of 32 x 32
x, w, g = torch.randn(M, K), torch.randn(K, N) / 8, torch.randn(M, K)
blocks = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)

def run(grad, persistent, programs, h_in=None):
    h = h_in if grad else torch.full((M, N), float("nan"))
    out = torch.full((M, N), float("nan"))
    a, b = (g, w) if grad else (x, w)
    fk.mlp_act_mm_kernel[(programs,)](a, b, h, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                      GRAD=grad, PERSISTENT=persistent, INTERPRET=True, **blocks)
    return h, out

h_t, a_t = run(False, False, 15)
h_p, a_p = run(False, True, 4)  # 4 programs walk 15 tiles: 4, 4, 4, 3 each
_, d_t = run(True, False, 15, h_t)
_, d_p = run(True, True, 4, h_t)
print(json.dumps({"fwd_equal": torch.equal(h_t, h_p) and torch.equal(a_t, a_p), "bwd_equal": torch.equal(d_t, d_p),
                  "all_written": not (h_p.isnan().any() or a_p.isnan().any() or d_p.isnan().any()).item(),
                  "h_is_xw": torch.allclose(h_t, x @ w, rtol=1e-2, atol=1e-2)}))  # h is bf16-rounded
"""


def test_persistent_mlp_kernel_walks_every_tile():
    """The persistent form of the MLP kernel (the H100 forward: fewer programs than tiles, each walking its
    share) writes every tile, with the same values as one program per tile; under Triton's CPU interpreter."""
    import json
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(tg.Path(tg.__file__).parent)}
    out = subprocess.run([sys.executable, "-c", PERSISTENT_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r == {"fwd_equal": True, "bwd_equal": True, "all_written": True, "h_is_xw": True}, r


def test_fused_mlp_flag_off_takes_the_plain_path():
    pytest.importorskip("triton")
    assert run_fused_mlp_check(0)["fused_calls"] == 0


def test_cutlass_mlp_says_why_it_is_off(tmp_path, monkeypatch):
    """CUTLASS's MLP kernels stay off, with a reason for the log, off Hopper or without nvcc or CUTLASS headers."""
    import fused_kernels as fk
    assert fk.enable_cutlass_mlp(torch.device("cpu"), tmp_path) == "off (not a Hopper GPU)" and fk.cutlass_lib is None
    monkeypatch.setattr(fk.shutil, "which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="no nvcc"):
        fk.build_cutlass_mlp(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(fk, "cutlass_include", lambda: None)
    with pytest.raises(RuntimeError, match="no CUTLASS headers"):
        fk.build_cutlass_mlp(tmp_path)


CONCURRENT_BUILD = r"""
import sys, pathlib
import fused_kernels as fk
print(fk.build_cutlass_mlp(pathlib.Path(sys.argv[1])))
"""


def test_cutlass_mlp_ranks_share_one_build(tmp_path):
    """Four processes (ranks on one host) asking at once: nvcc runs once, under the lock, and all four get the
    library it wrote. A stand-in nvcc logs its calls and sleeps, so that the processes overlap."""
    import os
    import subprocess
    import sys
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo fake && exit 0\necho run >> {tmp_path}/calls\n'
                    'sleep 1\nfor a; do [ "$prev" = -o ] && echo lib > "$a"; prev=$a; done\n')
    nvcc.chmod(0o755)
    env = {**os.environ, "PATH": f"{nvcc.parent}:{os.environ['PATH']}", "CUTLASS_PATH": str(tmp_path),
           "PYTHONPATH": str(tg.Path(tg.__file__).parent)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_BUILD, str(tmp_path / "build")], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert (tmp_path / "calls").read_text() == "run\n" and len(outs) == 1
    assert tg.Path(outs.pop()).read_text() == "lib\n"


def cutlass_toolchain():
    import fused_kernels as fk
    if fk.shutil.which("nvcc") is None or fk.cutlass_include() is None:
        pytest.skip("needs nvcc and CUTLASS headers (pip install --no-deps nvidia-cutlass)")
    return fk


def test_cutlass_mlp_builds_once_and_reports_nvcc_errors(tmp_path, monkeypatch):
    """cutlass_mlp.cu compiles for sm_90a (no GPU needed); a second call reuses the library; a source nvcc
    rejects raises with nvcc's message and leaves no library or temporary file behind."""
    fk = cutlass_toolchain()
    lib = fk.build_cutlass_mlp(tmp_path)
    built = lib.stat().st_mtime_ns
    assert fk.build_cutlass_mlp(tmp_path) == lib and lib.stat().st_mtime_ns == built
    bad = tmp_path / "src" / "cutlass_mlp.cu"
    bad.parent.mkdir()
    bad.write_text(fk.CUTLASS_SOURCE.read_text().replace("return T(a * a);", "return T(a * a)"))
    monkeypatch.setattr(fk, "CUTLASS_SOURCE", bad)
    with pytest.raises(RuntimeError, match="nvcc failed"):
        fk.build_cutlass_mlp(tmp_path / "bad")
    assert [f.suffix for f in (tmp_path / "bad").iterdir()] == [".lock"]


def test_cutlass_mlp_matches_the_triton_kernels_bit_for_bit(tmp_path):
    """On a Hopper GPU: the MLP module through CUTLASS's kernels gives the Triton kernels' output and gradients,
    bit for bit; and the kernels take row counts that are not a multiple of their tiles."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs a Hopper GPU")
    fk = cutlass_toolchain()
    assert fk.enable_cutlass_mlp(torch.device("cuda"), tmp_path).startswith("on")
    cfg = tg.build_config("h100", flags=dict(fused_kernels=1), env={})
    torch.manual_seed(0)
    mlp = tg.MLP(cfg).cuda().bfloat16()
    x = torch.randn(4, 512, cfg.model_dim, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    scale = (1 + 0.5 * torch.randn(cfg.model_dim, device="cuda")).bfloat16()

    def run():
        xi = x.clone().requires_grad_()
        mlp.zero_grad(set_to_none=True)
        y = mlp(xi, scale)
        y.backward(g)
        return [y, xi.grad, mlp.up.weight.grad, mlp.down.weight.grad]

    try:
        assert mlp.fused_applies(x)
        got = run()
        lib, fk.cutlass_lib = fk.cutlass_lib, None
        want = run()
        fk.cutlass_lib = lib
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        xo = torch.randn(1000, 512, device="cuda", dtype=torch.bfloat16)  # 1000 rows: a partial last tile
        w_up = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16) / 512 ** 0.5
        h, a = fk.mlp_up_act_cutlass(xo, w_up)
        ref = (xo.float() @ w_up.float().t()).bfloat16()
        assert (h.float() - ref.float()).abs().max() <= 2 * ref.float().abs().max() * 2 ** -8
        assert torch.equal(a, (torch.where(h > 0, h.float(), 0.5 * h.float()) ** 2).bfloat16())
    finally:
        fk.cutlass_lib = None


# ---------------------------------------------------------------------------------------------------
# optimizer grouping and Newton-Schulz
# ---------------------------------------------------------------------------------------------------


def test_param_grouping_rule(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = tg.GPT(cfg)
    embed, matrices, scalars = tg.param_groups(model)
    e, m, s = ({n for n, _ in g} for g in (embed, matrices, scalars))
    names = {n for n, _ in model.named_parameters()}
    assert e | m | s == names and not (e & m) and not (e & s) and not (m & s)
    assert e == {"tok_emb.weight"}
    for must in ("bigram_embed.weight", "bigram_proj.weight", "ve_embed.weight", "ve_proj.weight",
                 "skip_weights", "blocks.0.resid_mix", "blocks.0.attn.c_q.weight", "blocks.3.mlp.down.weight"):
        assert must in m, must
    for must in ("bigram_scale", "smear_gate", "ve_scale", "ve_layer_scales", "blocks.1.attn.q_gain",
                 "blocks.1.attn.vr_lambda", "blocks.2.attn_scale", "blocks.2.mlp_scale"):
        assert must in s, must
    params = dict(model.named_parameters())
    assert all(params[n].ndim >= 2 for n in m) and all(params[n].ndim < 2 for n in s)
    opt = tg.Optimizers(model, cfg, dist1())
    assert set(opt.muon.names) == m and set(opt.adam_names) == e | s


@pytest.mark.parametrize("shape", [(3, 96, 32), (2, 32, 96), (1, 64, 128), (2, 128, 48)])
def test_zeropower_ns5_is_approximately_orthogonal(shape):
    g = torch.Generator().manual_seed(sum(shape))
    G = torch.randn(*shape, generator=g)
    X = tg.zeropower_ns5(G, 5)
    assert X.shape == G.shape
    sv = torch.linalg.svdvals(X.float())
    assert sv.min() > 0.5 and sv.max() < 1.5, (sv.min().item(), sv.max().item())
    # and it is the polar factor's direction: X ~ U V^T of G
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = F.cosine_similarity(X.float().flatten(1), (U @ Vh).flatten(1), dim=1)
    assert (cos > 0.9).all()


# ---------------------------------------------------------------------------------------------------
# causality
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 17, 40, 63])
def test_model_is_causal(tmp_path, t):
    cfg = tiny_cfg(tmp_path)
    model = randomize(tg.GPT(cfg), seed=t, std=0.08).eval()
    g = torch.Generator().manual_seed(100 + t)
    ids = torch.randint(2, cfg.vocab_size, (2, 64), generator=g)
    ids[1, 10] = tg.GPT.BOS_ID  # a document boundary in the middle
    ids2 = ids.clone()
    ids2[:, t] = (ids[:, t] + 1 + torch.randint(0, cfg.vocab_size - 3, (2,), generator=g)) % cfg.vocab_size
    with torch.no_grad():
        a, b = model.logits(model.hidden(ids)), model.logits(model.hidden(ids2))
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])  # the change is visible from position t on
    assert (a[:, -1] - b[:, -1]).abs().max() > 0  # ... and reaches the end through attention
