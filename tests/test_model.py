"""Model section: size of the record model, shapes and gradients, QAT quantizers, parameter grouping,
causality, Newton-Schulz orthogonalization."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import hq_optim
from conftest import dist1, randomize, smoke_cfg, tg

ALPHABETS = [tg.PENT, tg.INT4, tg.INT5, tg.INT6]


def tiny_cfg(tmp_path, **flags):
    return smoke_cfg(tmp_path, **flags)


# ---------------------------------------------------------------------------------------------------
# size and shapes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,count", [("v61", 32_760_946), ("h100", 30_008_434)])
def test_record_models_have_exact_parameter_count(preset, count):
    # v61: the spec's count; h100: MLP 3.5x takes 2 x 11 x 512 x 256 weights off it
    cfg = tg.build_config(preset, env={})
    with torch.device("meta"):
        model = tg.GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == count


def test_v61_preset_is_the_seeds_recipe():
    """--preset v61 reproduces the seed's recipe: the spec's bits per group and its eval settings."""
    cfg = tg.build_config("v61", env={})
    assert (cfg.qk_alphabet, cfg.vo_alphabet, cfg.mlp_up_alphabet, cfg.mlp_down_alphabet) == (64, 32, 5, 16)
    assert (cfg.eval_seq_len, cfg.eval_stride, cfg.ttt_lr, cfg.ttt_epochs, cfg.ttt_chunk_tokens) == (1024, 64, 0.002, 3, 32768)
    assert (cfg.warmup_by_clock, cfg.final_weights, cfg.embed_bits) == (0, "swa", 16)
    assert dataclasses.asdict(cfg) | {"run_dir": ""} == dataclasses.asdict(tg.Config())


def test_alphabet_fields_set_the_groups_and_are_checked(tmp_path):
    model = tg.GPT(tiny_cfg(tmp_path, qk_alphabet=128, vo_alphabet=16, mlp_up_alphabet=16, mlp_down_alphabet=32))
    got = {n.split(".", 2)[2]: m.alphabet for n, m in model.named_modules()
           if isinstance(m, tg.QATLinear) and n.startswith("blocks.1.")}
    assert got == {"attn.c_q": 128, "attn.c_k": 128, "attn.c_v": 16, "attn.proj": 16, "mlp.up": 16, "mlp.down": 32}
    assert tg.group_name("blocks.3.mlp.up.weight", 16) == "int4 mlp-up"
    assert tg.group_name("tok_emb.weight", tg.INT6) == "int6 tok_emb"
    for bad in (7, 4, 512, 0):
        with pytest.raises(tg.InputError, match="MLP_UP_ALPHABET"):
            tiny_cfg(tmp_path, mlp_up_alphabet=bad)


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


CANDIDATES = [{}, {"parallel_from": 2}, {"recur_layers": "1,2"}, {"parallel_from": 1, "recur_layers": "1,2"},
              {"parallel_from": 2, "recur_layers": "1,2"}]  # last: a plain block runs again after a lanes block


@pytest.mark.parametrize("flags", CANDIDATES, ids=str)
def test_gradients_reach_every_block_once_weights_are_nonzero(tmp_path, flags):
    """With non-degenerate weights every parameter (except layer 0's unused lambda) gets a nonzero grad."""
    cfg = tiny_cfg(tmp_path, **flags)
    model = randomize(tg.GPT(cfg), seed=1, std=0.05)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    model(ids, ids.roll(-1, 1)).backward()
    for n, p in model.named_parameters():
        if n != "blocks.0.attn.vr_lambda":
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def _hidden(model, ids):
    with torch.no_grad():
        return model.hidden(ids)


def test_parallel_lanes_start_as_the_plain_block_and_learn_their_routing(tmp_path):
    plain = randomize(tg.GPT(tiny_cfg(tmp_path)), seed=3, std=0.05)
    lanes = tg.GPT(tiny_cfg(tmp_path, parallel_from=2))
    missing = lanes.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["blocks.2.lane_weights", "blocks.3.lane_weights"]  # 4 weights a block, all 1
    ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_hidden(lanes, ids), _hidden(plain, ids))
    with torch.no_grad():
        lanes.blocks[3].lane_weights.copy_(torch.tensor([1.0, 0.5, 0.0, 1.5]))  # the MLP skips attention's lane
    assert not torch.allclose(_hidden(lanes, ids), _hidden(plain, ids))


def test_a_plain_block_given_both_lanes_reads_their_mean(tmp_path):
    """In recurrence a plain block can follow a lanes block (PARALLEL_FROM=2, RECUR_LAYERS=1,2): it reads the
    lanes merged, as the final norm does, instead of dropping the MLP's lane."""
    model = randomize(tg.GPT(tiny_cfg(tmp_path, parallel_from=2, recur_layers="1,2")), seed=6, std=0.05)
    g = torch.Generator().manual_seed(3)
    x, xm, x0 = (torch.randn(2, 16, model.cfg.model_dim, generator=g) for _ in range(3))
    rope = (model.rope_cos[:, :16], model.rope_sin[:, :16])
    with torch.no_grad():
        got, _, lane = model.blocks[1](x, x0, rope, None, None, xm)
        want, _, _ = model.blocks[1](0.5 * (x + xm), x0, rope, None, None)
    assert lane is None and torch.equal(got, want)


def test_depth_recurrence_runs_its_layers_twice_once_active(tmp_path):
    plain = randomize(tg.GPT(tiny_cfg(tmp_path)), seed=4, std=0.05)
    rec = tg.GPT(tiny_cfg(tmp_path, recur_layers="1,2"))
    assert rec.load_state_dict(plain.state_dict()) is not None  # no parameters of its own
    order = []
    for i, b in enumerate(rec.blocks):
        b.register_forward_hook(lambda m, a, o, i=i: order.append(i))
    ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(1))
    assert rec.recur_active  # a model built with RECUR_LAYERS runs them (training switches them on late)
    h = _hidden(rec, ids)
    assert order == [0, 1, 2, 1, 2, 3] and not torch.allclose(h, _hidden(plain, ids))
    order.clear()
    rec.recur_active = False
    assert torch.equal(_hidden(rec, ids), _hidden(plain, ids)) and order == [0, 1, 2, 3]


@pytest.mark.parametrize("flags", CANDIDATES[1:], ids=str)
def test_candidates_trace_as_one_graph_each_way(tmp_path, flags):
    """Training compiles the model with fullgraph=True: dynamo (no inductor, so on CPU) must capture it whole,
    recurrence off and on, and match the eager model."""
    torch._dynamo.reset()
    model = randomize(tg.GPT(tiny_cfg(tmp_path, **flags)), seed=5, std=0.05)
    fwd = torch.compile(model, dynamic=False, fullgraph=True, backend="eager")
    ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(2))
    for on in (False, True):
        model.recur_active = on and bool(model.recur)
        with torch.no_grad():
            assert torch.allclose(fwd(ids, ids.roll(-1, 1)), model(ids, ids.roll(-1, 1)), atol=1e-6)


@pytest.mark.parametrize("flags,words", [
    ({"recur_layers": "2,1"}, "RECUR_LAYERS '2,1' must be consecutive"), ({"recur_layers": "1,3"}, "consecutive"),
    ({"recur_layers": "3,4"}, "within 0..3"), ({"recur_layers": "a"}, "not a comma-separated list"),
    ({"recur_start": 1.5}, "RECUR_START"), ({"recur_start": -0.1}, "RECUR_START"),
    ({"parallel_from": 4}, "PARALLEL_FROM must be in 0..3"), ({"parallel_from": -1}, "PARALLEL_FROM")])
def test_candidate_fields_are_checked(tmp_path, flags, words):
    with pytest.raises(tg.InputError, match=words):
        tiny_cfg(tmp_path, **flags)


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


# ---------------------------------------------------------------------------------------------------
# optimizer grouping and Newton-Schulz
# ---------------------------------------------------------------------------------------------------


def test_param_grouping_rule(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = tg.GPT(cfg)
    embed, matrices, scalars = hq_optim.param_groups(model)
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
    X = hq_optim.zeropower_ns5(G, 5)
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


@pytest.mark.parametrize("flags", CANDIDATES, ids=str)
@pytest.mark.parametrize("t", [1, 17, 40, 63])
def test_model_is_causal(tmp_path, t, flags):
    cfg = tiny_cfg(tmp_path, **flags)
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
