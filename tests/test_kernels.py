"""Kernels section (fused_kernels.py, the fast path's one seam): the model's ops take their kernels only where
they apply, and the kernels match the plain PyTorch path: the Triton kernels under Triton's CPU interpreter
(in a child process: TRITON_INTERPRET must be set before the kernels are defined), the CUTLASS build, and
inductor's settings."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fused_kernels as fk
from conftest import ROOT, tg


def run_interpreted(script: str, *args: str) -> dict:
    """Runs script in a child process under Triton's CPU interpreter; its last stdout line, as JSON."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# the seam: which ops take a kernel
# ---------------------------------------------------------------------------------------------------


def test_ops_take_the_plain_path_where_no_kernel_applies(monkeypatch):
    """On a CPU without Triton's interpreter every op returns what its plain reference returns for the same
    arguments (the interpreted kernels, and the flag switching them off, are tested below)."""
    monkeypatch.setattr(fk, "TRITON_ON_CPU", False)
    plain = lambda *a: ("plain", len(a))  # noqa: E731
    x = torch.randn(2, 128, 64, dtype=torch.bfloat16)
    cos, sin = tg.rope_tables(128, 8, "cpu")
    assert fk.attn_inputs(torch.randn(2, 128, 8 * 32, dtype=torch.bfloat16), cos, sin, torch.ones(4), None, None,
                          None, 4, 2, on=True, plain=lambda *a: (a[0],) * 3)[3].shape == (2, 128, 256)
    assert fk.attention(x, x, x, plain=plain) == ("plain", 3)
    proj = tg.QATLinear(64, 64, tg.INT5)
    assert fk.xsa_proj(x.view(2, 128, 1, 2, 32), x, proj, on=True, plain=plain) == ("plain", 4)
    mlp = tg.MLP(tg.build_config("smoke", flags=dict(model_dim=64, mlp_mult=4.0), env={}))
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.1)
    assert mlp.fused and not fk.mlp_applies(x, mlp.up.weight)
    assert fk.mlp(x, mlp.up, mlp.down, on=True, plain=plain) == ("plain", 4)
    assert torch.equal(mlp(x), mlp.down(torch.nn.functional.leaky_relu(mlp.up(x), 0.5).square()))


# ---------------------------------------------------------------------------------------------------
# Triton kernels against the plain path (Triton's CPU interpreter)
# ---------------------------------------------------------------------------------------------------


# Runs in a child process: Triton's interpreter must be switched on before the kernels are defined.
FUSED_MLP_CHECK = r"""
import json, sys, torch
import fused_kernels as fk
import train_gpt as tg
assert fk.TRITON_ON_CPU
calls = []
apply = fk.FusedMLP.apply
fk.FusedMLP.apply = lambda *a: calls.append(1) or apply(*a)
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
    return run_interpreted(FUSED_MLP_CHECK, str(fused_mlp))


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
import fused_kernels as fk
import train_gpt as tg
calls = []
apply = fk.FusedXSAProj.apply
fk.FusedXSAProj.apply = lambda *a: calls.append(1) or apply(*a)
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
    out = fk.xsa_proj(yi, vi, proj, si, on=fused, plain=tg.xsa_proj)
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
    r = run_interpreted(XSA_CHECK)
    assert r["fused_calls"] == 1 and r["calls"] == 1  # the kernel ran, and only when asked
    for fused, plain in zip(r["fused"], r["plain_bf16"]):
        assert plain < 0.01 and fused < 0.02, r
    assert max(r["fp32"]) < 1e-5, r


ATTN_INPUTS_CHECK = r"""
import json, torch
import fused_kernels as fk
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
        for name, fn, dt in (("fp32", fk.FusedAttnInputs.apply, torch.float32), ("fused", fk.FusedAttnInputs.apply, torch.bfloat16),
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
    r = run_interpreted(ATTN_INPUTS_CHECK)
    assert max(r["fp32"]) < 1e-5, r
    for fused, plain in zip(r["fused"], r["plain_bf16"]):
        assert plain < 0.02 and fused < 0.02, r  # the gain gradient sums many bf16 products: 1.3e-2 plain


MODEL_FUSED_CHECK = r"""
import json, torch
import fused_kernels as fk
import train_gpt as tg
assert fk.TRITON_ON_CPU
calls = {}
for name in ("FusedMLP", "FusedXSAProj", "FusedAttnInputs"):
    fn = getattr(fk, name).apply
    setattr(getattr(fk, name), "apply", (lambda f, n: lambda *a: calls.__setitem__(n, calls.get(n, 0) + 1) or f(*a))(fn, name))
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
    pytest.importorskip("triton")
    r = run_interpreted(MODEL_FUSED_CHECK)
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
    pytest.importorskip("triton")
    r = run_interpreted(PERSISTENT_CHECK)
    assert r == {"fwd_equal": True, "bwd_equal": True, "all_written": True, "h_is_xw": True}, r


def test_fused_mlp_flag_off_takes_the_plain_path():
    pytest.importorskip("triton")
    assert run_fused_mlp_check(0)["fused_calls"] == 0

# ---------------------------------------------------------------------------------------------------
# CUTLASS's MLP kernels
# ---------------------------------------------------------------------------------------------------


def test_cutlass_mlp_says_why_it_is_off(tmp_path, monkeypatch):
    """CUTLASS's MLP kernels stay off, with a reason for the log, off Hopper or without nvcc or CUTLASS headers."""
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
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo fake && exit 0\necho run >> {tmp_path}/calls\n'
                    'sleep 1\nfor a; do [ "$prev" = -o ] && echo lib > "$a"; prev=$a; done\n')
    nvcc.chmod(0o755)
    env = {**os.environ, "PATH": f"{nvcc.parent}:{os.environ['PATH']}", "CUTLASS_PATH": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_BUILD, str(tmp_path / "build")], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert (tmp_path / "calls").read_text() == "run\n" and len(outs) == 1
    assert tg.Path(outs.pop()).read_text() == "lib\n"


def cutlass_toolchain():
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
        assert fk.mlp_applies(x, mlp.up.weight)
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
# inductor's settings
# ---------------------------------------------------------------------------------------------------


def test_tune_inductor_pipelines_mix_order_reductions_only_with_room(monkeypatch):
    """Two pipeline stages of the mix-order reductions need ~100 KiB of shared memory per block: set on a GPU that
    has it (H100: 227 KiB), left at inductor's defaults on CPU and on a GPU that has not (a 3090: 99 KiB)."""
    import torch._inductor.config as inductor
    for key in ("mix_order_reduction_allow_multi_stages", "mix_order_reduction_split_size"):
        monkeypatch.setattr(inductor.triton, key, getattr(inductor.triton, key))  # restored after the test
    before = (inductor.triton.mix_order_reduction_allow_multi_stages, inductor.triton.mix_order_reduction_split_size)
    assert fk.tune_inductor(torch.device("cpu")) == "default"

    class Props:
        shared_memory_per_block_optin = 99 << 10
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    assert fk.tune_inductor(torch.device("cuda", 0)) == "default"
    assert (inductor.triton.mix_order_reduction_allow_multi_stages, inductor.triton.mix_order_reduction_split_size) == before
    Props.shared_memory_per_block_optin = 227 << 10
    assert "pipelined" in fk.tune_inductor(torch.device("cuda", 0))
    assert inductor.triton.mix_order_reduction_allow_multi_stages is True
    assert inductor.triton.mix_order_reduction_split_size == 32
    # requirements.txt allows torch >= 2.5, whose inductor has no such settings: then nothing is set, and no error
    import types
    monkeypatch.setattr(torch._inductor, "config", types.SimpleNamespace(triton=types.SimpleNamespace()))
    assert fk.tune_inductor(torch.device("cuda", 0)).startswith("default")
