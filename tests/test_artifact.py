"""Quantization and artifact section: exact round trip, both compressors, int6 embeddings, refusal of
corrupted / truncated / foreign / pickle-bearing files, the size cap, the size table."""
import copy
import hashlib
import io
import json
import lzma
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import dist1, quiet_log, randomize, smoke_cfg, tg


def expected_state(model, cfg):
    """What the artifact must decode to: quantize->dequantize for quantized tensors, fp16 for the rest."""
    qnames = tg.quantized_tensors(model, cfg)
    out = {}
    for k, v in model.state_dict().items():
        w = v.detach().float()
        out[k] = tg.dequantize_rows(*tg.quantize_rows(w, qnames[k]), qnames[k]) if k in qnames else w.half().float()
    return out


def qat_reference(model, cfg):
    """The trained model as training saw it: QAT forward, passthrough params rounded to fp16
    (and, with embed_bits=6, the embedding replaced by its int6 round trip)."""
    ref = copy.deepcopy(model)
    ref.set_quantized(True)
    exp = expected_state(ref, cfg)
    qat = {f"{n}.weight" for n, m in ref.named_modules() if isinstance(m, tg.QATLinear)}
    with torch.no_grad():
        for k, p in ref.named_parameters():
            if k not in qat:
                p.copy_(exp[k])
    return ref.eval()


@pytest.fixture
def ids():
    return torch.randint(0, 1024, (2, 96), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def artifact(trained):
    payload, table = tg.build_artifact(trained["model"], trained["cfg"])
    return {"payload": payload, "table": table, "xz": tg.compress(payload, "lzma"),
            "zst": tg.compress(payload, "zstd")}


def test_round_trip_state_is_exact(trained, artifact):
    model, cfg = trained["model"], trained["cfg"]
    mcfg, sd = tg.parse_artifact(artifact["xz"], "model.hqa")
    assert all(getattr(mcfg, k) == getattr(cfg, k) for k in tg.MODEL_FIELDS)
    exp = expected_state(model, cfg)
    assert sd.keys() == exp.keys()
    qnames = tg.quantized_tensors(model, cfg)
    assert len(qnames) == 6 * cfg.num_layers and "tok_emb.weight" not in qnames
    for k in exp:
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], exp[k]), k


def test_round_trip_logits_are_identical(trained, artifact, tmp_path, ids):
    path = tmp_path / "model.hqa"
    path.write_bytes(artifact["xz"])
    loaded, _ = tg.load_artifact(str(path), torch.device("cpu"))
    assert not any(m.quantized for m in loaded.modules() if isinstance(m, tg.QATLinear))
    ref = qat_reference(trained["model"], trained["cfg"])
    with torch.no_grad():
        a, b = ref.logits(ref.hidden(ids)), loaded.eval().logits(loaded.hidden(ids))
    assert torch.equal(a, b)
    # and quantization is not a no-op: the raw (unquantized) model differs
    raw = copy.deepcopy(trained["model"])
    raw.set_quantized(False)
    with torch.no_grad():
        assert not torch.equal(raw.logits(raw.hidden(ids)), a)


def test_lzma_and_zstd_both_load_identically(artifact):
    assert artifact["xz"][:6] == b"\xfd7zXZ\x00" and artifact["zst"][:4] == b"\x28\xb5\x2f\xfd"
    _, a = tg.parse_artifact(artifact["xz"], "a.hqa")
    _, b = tg.parse_artifact(artifact["zst"], "b.hqa")
    _, c = tg.parse_artifact(artifact["payload"], "c.hqa")  # uncompressed payload is accepted too
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_embed_bits_6(trained, tmp_path, ids):
    cfg6 = copy.deepcopy(trained["cfg"])
    cfg6.embed_bits = 6
    model = trained["model"]
    assert tg.quantized_tensors(model, cfg6)["tok_emb.weight"] == tg.INT6
    payload6, table6 = tg.build_artifact(model, cfg6)
    payload16, _ = tg.build_artifact(model, trained["cfg"])
    assert len(payload6) < len(payload16) - 50_000  # 1024x64 embedding: 2 bytes -> ~6 bits per weight
    assert "int6 tok_emb" in [g for g, *_ in table6]
    path = tmp_path / "model.hqa"
    path.write_bytes(tg.compress(payload6, "zstd"))
    loaded, _ = tg.load_artifact(str(path), torch.device("cpu"))
    exp = expected_state(model, cfg6)
    assert all(torch.equal(v, exp[k]) for k, v in loaded.state_dict().items())
    w = model.tok_emb.weight.detach().float()
    assert not torch.equal(exp["tok_emb.weight"], w.half().float())
    ref = qat_reference(model, cfg6)
    with torch.no_grad():
        assert torch.equal(ref.logits(ref.hidden(ids)), loaded.eval().logits(loaded.hidden(ids)))


def test_round_trip_of_a_random_model_with_all_tensors_nonzero(tmp_path, ids):
    """Every tensor (incl. the zero-initialized ones) carries information through the codec."""
    cfg = smoke_cfg(tmp_path, compressor="zstd")
    model = randomize(tg.GPT(cfg), seed=3, std=0.2)
    _, sd = tg.parse_artifact(tg.compress(tg.build_artifact(model, cfg)[0], "zstd"), "x")
    exp = expected_state(model, cfg)
    assert all(torch.equal(sd[k], exp[k]) and exp[k].abs().sum() > 0 for k in exp)


def test_size_table_sums_to_payload(trained, artifact):
    model = trained["model"]
    table, payload = artifact["table"], artifact["payload"]
    names = [g for g, *_ in table]
    assert set(names) == {"fp16 passthrough", "int6 q/k", "int5 v/o", "int4 mlp-down", "pent mlp-up",
                          "header+framing"}
    assert abs(sum(t[3] for t in table) - len(payload)) < 1e-6
    assert sum(t[1] for t in table) == sum(p.numel() for p in model.parameters())
    bpw = {g: b for g, _, b, _ in table}
    assert bpw["fp16 passthrough"] == 16.0
    for g, hi in (("int6 q/k", 6.5), ("int5 v/o", 5.5), ("int4 mlp-down", 4.5), ("pent mlp-up", 2.9)):
        assert 0 < bpw[g] < hi, (g, bpw[g])
    assert all(t[3] >= 0 for t in table)


# ---------------------------------------------------------------------------------------------------
# write_artifact and the size cap
# ---------------------------------------------------------------------------------------------------


def test_write_artifact_under_cap(trained, tmp_path):
    cfg = copy.deepcopy(trained["cfg"])
    cfg.run_dir = str(tmp_path / "run")
    path, info = tg.write_artifact(trained["model"], cfg, dist1(), quiet_log(tmp_path / "log"))
    assert Path(path) == tmp_path / "run" / "model.hqa" and Path(path).exists()
    assert info["bytes_model"] == Path(path).stat().st_size
    assert info["bytes_code"] == tg.code_bytes() == sum((Path(tg.__file__).parent / f).stat().st_size
                                                         for f in ("train_gpt.py", "fused_kernels.py", "cutlass_mlp.cu", "rans_codec.py"))
    assert info["bytes_total"] == info["bytes_model"] + info["bytes_code"] <= tg.SIZE_CAP
    assert "UNDER" in (tmp_path / "log").read_text()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["model.hqa"]  # no temp file left behind
    tg.load_artifact(path, torch.device("cpu"))


@pytest.mark.parametrize("cap_from", ["code_only", "tiny"])
def test_over_cap_fails_and_writes_nothing(trained, tmp_path, monkeypatch, cap_from):
    cfg = copy.deepcopy(trained["cfg"])
    cfg.run_dir = str(tmp_path / "run")
    # the code alone fits, but code + compressed model does not
    monkeypatch.setattr(tg, "SIZE_CAP", tg.code_bytes() + 1000 if cap_from == "code_only" else 1000)
    with pytest.raises(SystemExit) as e:
        tg.write_artifact(trained["model"], cfg, dist1(), quiet_log(tmp_path / "log"))
    assert "exceed" in str(e.value.code)
    assert not (tmp_path / "run" / "model.hqa").exists()
    assert not list((tmp_path / "run").glob("*")) if (tmp_path / "run").exists() else True
    assert "OVER" in (tmp_path / "log").read_text()


# ---------------------------------------------------------------------------------------------------
# refusal of bad files
# ---------------------------------------------------------------------------------------------------


def _refused(data: bytes, tmp_path, name="bad.hqa"):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(tg.InputError) as e:
        tg.load_artifact(str(path), torch.device("cpu"))
    assert str(path) in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("kind", ["xz", "zst", "payload"])
@pytest.mark.parametrize("where", [0, 5, 9, 40, 0.25, 0.5, 0.75, -40, -1])
def test_bit_flip_is_refused(artifact, tmp_path, kind, where):
    data = bytearray(artifact[kind])
    i = int(where * len(data)) if isinstance(where, float) else where % len(data)
    for bit in (0, 7):
        bad = bytearray(data)
        bad[i] ^= 1 << bit
        _refused(bytes(bad), tmp_path)


@pytest.mark.parametrize("kind", ["xz", "zst", "payload"])
@pytest.mark.parametrize("keep", [0, 3, 12, 100, 0.5, -32, -1])
def test_truncated_file_is_refused(artifact, tmp_path, kind, keep):
    data = artifact[kind]
    n = int(keep * len(data)) if isinstance(keep, float) else keep % len(data) if keep < 0 else keep
    _refused(data[:n], tmp_path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(tg.InputError, match="cannot read"):
        tg.load_artifact(str(tmp_path / "nope.hqa"), torch.device("cpu"))


@pytest.mark.parametrize("prefix", [b"", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", tg.ARTIFACT_MAGIC])
def test_random_bytes_are_refused(tmp_path, prefix):
    rng = np.random.default_rng(len(prefix))
    for n in (1, 64, 5000):
        _refused(prefix + rng.integers(0, 256, n, dtype=np.uint8).tobytes(), tmp_path)


class Evil:
    """Unpickling this calls Path.write_text: a file appears if anything unpickles the artifact."""
    marker = None

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.parametrize("wrap", ["raw", "xz", "zstd", "after_magic"])
def test_pickle_bearing_files_are_refused_without_running_code(tmp_path, trained, wrap):
    marker = tmp_path / "PWNED"
    Evil.marker = str(marker)
    evil = pickle.dumps({"model": Evil()})
    buf = io.BytesIO()
    torch.save({"model": trained["model"].state_dict(), "config": {}, "x": Evil()}, buf)
    for blob in (evil, buf.getvalue()):
        if wrap == "xz":
            blob = lzma.compress(blob, format=lzma.FORMAT_XZ)
        elif wrap == "zstd":
            blob = tg.compress(blob, "zstd")
        elif wrap == "after_magic":  # a pickle where the header should be, with a valid checksum
            body = tg.ARTIFACT_MAGIC + len(blob).to_bytes(4, "little") + blob
            blob = body + hashlib.sha256(body).digest()
        _refused(blob, tmp_path)
        assert not marker.exists()
    pickle.loads(evil)  # the payload really is armed: unpickling runs it
    assert marker.read_text() == "pwned"


def _forge(payload: bytes, edit) -> bytes:
    """Re-encode an artifact with an edited JSON header and a valid checksum (checksums are not a MAC)."""
    hl = int.from_bytes(payload[8:12], "little")
    header = json.loads(payload[12:12 + hl])
    edit(header)
    hj = json.dumps(header).encode()
    body = tg.ARTIFACT_MAGIC + len(hj).to_bytes(4, "little") + hj + payload[12 + hl:-32]
    return body + hashlib.sha256(body).digest()


FORGERIES = {
    "shape_mismatch": lambda h: h["tensors"][0].__setitem__("shape", [7, 3]),
    "huge_shape": lambda h: next(t for t in h["tensors"] if "offset" in t).__setitem__("shape", [1 << 20, 1 << 20]),
    "negative_offset": lambda h: next(t for t in h["tensors"] if "offset" in t).__setitem__("offset", -64),
    "config_mismatch": lambda h: h["config"].__setitem__("num_layers", 3),
    "bad_config_value": lambda h: h["config"].__setitem__("mlp_mult", "wide"),
    "invalid_config": lambda h: h["config"].__setitem__("num_kv_heads", 3),
    "missing_key": lambda h: h.pop("rans_offset"),
    "rans_out_of_range": lambda h: h.__setitem__("rans_offset", 10 ** 9),
    "dropped_tensor": lambda h: h["tensors"].pop(),
    "dropped_quantized_tensor": lambda h: h["tensors"].remove(next(t for t in h["tensors"] if "alphabet" in t)),
    "header_not_a_dict": lambda h: (h.clear(), h.__setitem__("config", [1, 2])),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_header_with_valid_checksum_is_refused(artifact, tmp_path, name):
    _refused(tg.compress(_forge(artifact["payload"], FORGERIES[name]), "zstd"), tmp_path)


def test_forged_zero_heads_is_refused(artifact, tmp_path):
    """Regression: a header config with num_heads=0 once escaped parse_artifact as ZeroDivisionError."""
    _refused(_forge(artifact["payload"], lambda h: h["config"].__setitem__("num_heads", 0)), tmp_path)


def test_forged_round_trip_helper_is_faithful(artifact):
    """_forge with no edit yields a loadable artifact, so the refusals above come from the edits."""
    cfg, sd = tg.parse_artifact(_forge(artifact["payload"], lambda h: None), "x")
    _, ref = tg.parse_artifact(artifact["payload"], "y")
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_forged_huge_config_is_refused_before_allocating(artifact, tmp_path):
    """A header asking for a 10**9-token vocabulary must be refused on shapes, not by running out of memory."""
    _refused(_forge(artifact["payload"], lambda h: h["config"].__setitem__("vocab_size", 10**9)), tmp_path)


def test_residual_dtype_travels_and_older_artifacts_load_as_fp32(artifact):
    """The residual stream's dtype changes eval numerics on GPUs, so the artifact carries it; artifacts
    written before the field existed were trained with an fp32 stream and must load as such."""
    cfg, _ = tg.parse_artifact(_forge(artifact["payload"], lambda h: h["config"].__setitem__("residual_dtype", "bf16")), "x")
    assert cfg.residual_dtype == "bf16"
    cfg, _ = tg.parse_artifact(_forge(artifact["payload"], lambda h: h["config"].pop("residual_dtype")), "x")
    assert cfg.residual_dtype == "fp32"
    _refused_cfg = _forge(artifact["payload"], lambda h: h["config"].__setitem__("residual_dtype", "fp8"))
    with pytest.raises(tg.InputError):
        tg.parse_artifact(_refused_cfg, "x")
