"""Quantization and artifact section: exact round trip, both compressors, int6 embeddings, refusal of
corrupted / truncated / foreign / pickle-bearing files, the size cap, the size table."""
import copy
import dataclasses
import hashlib
import io
import json
import lzma
import math
import pickle
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import hq_artifact as ha
import hq_gptq
import packing
import rans_codec as rc
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
    (and the tables stored as integers, EMBED_BITS/TABLE_BITS, replaced by their round trip)."""
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
    return {"payload": payload, "table": table, "xz": ha.compress(payload, "lzma"),
            "zst": ha.compress(payload, "zstd")}


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


@pytest.mark.parametrize("flags,groups", [({"embed_bits": 6}, ["int6 tok_emb"]), ({"embed_bits": 8}, ["int8 tok_emb"]),
                                          ({"table_bits": 8}, ["int8 bigram", "int8 value-emb"])])
def test_embedding_tables_stored_as_integers(trained, tmp_path, ids, flags, groups):
    cfg6 = dataclasses.replace(trained["cfg"], **flags)
    model = trained["model"]
    qnames = tg.quantized_tensors(model, cfg6)
    stored = {"tok_emb.weight"} if "embed_bits" in flags else {"bigram_embed.weight", "ve_embed.weight"}
    assert all(qnames[k] == 2 ** next(iter(flags.values())) for k in stored)
    payload6, table6 = tg.build_artifact(model, cfg6)
    payload16, _ = tg.build_artifact(model, trained["cfg"])
    saved = sum(2 * getattr(model, k.split(".")[0]).weight.numel() * (1 - next(iter(flags.values())) / 16) for k in stored)
    assert len(payload6) < len(payload16) - 0.8 * saved  # 2 bytes -> int-k symbols (and a scale per row)
    assert set(groups) <= {g for g, *_ in table6}
    path = tmp_path / "model.hqa"
    path.write_bytes(ha.compress(payload6, "zstd"))
    loaded, _ = tg.load_artifact(str(path), torch.device("cpu"))
    exp = expected_state(model, cfg6)
    assert all(torch.equal(v, exp[k]) for k, v in loaded.state_dict().items())
    for k in stored:
        assert not torch.equal(exp[k], dict(model.named_parameters())[k].detach().float().half().float())
    ref = qat_reference(model, cfg6)
    with torch.no_grad():
        assert torch.equal(ref.logits(ref.hidden(ids)), loaded.eval().logits(loaded.hidden(ids)))


def test_round_trip_of_a_random_model_with_all_tensors_nonzero(tmp_path, ids):
    """Every tensor (incl. the zero-initialized ones) carries information through the codec."""
    cfg = smoke_cfg(tmp_path, compressor="zstd")
    model = randomize(tg.GPT(cfg), seed=3, std=0.2)
    _, sd = tg.parse_artifact(ha.compress(tg.build_artifact(model, cfg)[0], "zstd"), "x")
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
# hq_artifact: the container alone (bytes and numpy arrays; no model, no torch)
# ---------------------------------------------------------------------------------------------------


def _quantize_np(x, a):
    s = np.abs(x).max(1, keepdims=True)
    return (np.clip(np.round(x / s * (a // 2)), -(a // 2), a // 2 - 1) + a // 2).astype(np.uint8), s.astype(np.float16)


def test_container_round_trips_arrays_without_a_model():
    rng = np.random.default_rng(0)
    w, g = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    payload, table = ha.pack([("w", w, 16), ("g", g, None)], {"k": 1}, _quantize_np, lambda n, a: f"{n}:{a}")
    assert [t[0] for t in table] == ["w:16", "fp16 passthrough", "header+framing"]
    assert abs(sum(t[3] for t in table) - len(payload)) < 1e-6
    sym, scale = _quantize_np(w, 16)
    for data in (payload, ha.compress(payload, "lzma"), ha.compress(payload, "zstd")):
        seen = []
        cfg, out = ha.parse(data, dict, lambda *a: seen.append(a))
        assert cfg == {"k": 1} and list(out) == ["w", "g"]
        assert seen == [(cfg, [("w", [4, 6], 16, 0), ("g", [5], None, 8)], 5, 29)]  # table, dim_cap, weights
        a, levels, s = out["w"]
        assert a == 16 and levels.dtype == np.float32 and np.array_equal(levels, sym - 8.0)
        assert s.dtype == np.float16 and np.array_equal(s, scale)
        assert out["g"].dtype == np.float32 and np.array_equal(out["g"], g.astype(np.float16).astype(np.float32))


def test_container_errors_carry_no_path_and_wrap_only_what_is_asked():
    payload, _ = ha.pack([("g", np.ones(3, np.float32), None)], {}, _quantize_np, None)
    with pytest.raises(ha.ArtifactError, match=r"^not an artifact \(neither xz, zstd nor a raw HQGPT61 payload\)$"):
        ha.parse(b"junk", dict, lambda *a: None)
    with pytest.raises(ha.ArtifactError, match=r"^checksum mismatch"):
        ha.parse(payload[:-1] + bytes([payload[-1] ^ 1]), dict, lambda *a: None)

    class Refused(Exception):
        pass

    def refuse(*a):
        raise Refused("no")
    with pytest.raises(ha.ArtifactError, match=r"^malformed artifact \(Refused: no\)$"):
        ha.parse(payload, refuse, lambda *a: None, wrap=(Refused,))
    with pytest.raises(Refused):  # not listed in wrap: the caller's own error passes through
        ha.parse(payload, dict, refuse)


def test_container_module_imports_neither_torch_nor_train_gpt():
    import subprocess
    import sys
    code = "import sys, hq_artifact; assert not {'torch', 'train_gpt'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=Path(ha.__file__).parent, check=True)
    assert "hq_artifact.py" in tg.CODE_FILES  # counted and packed with the rest of the code


# ---------------------------------------------------------------------------------------------------
# write_artifact and the size cap
# ---------------------------------------------------------------------------------------------------


def test_write_artifact_under_cap(trained, tmp_path):
    cfg = copy.deepcopy(trained["cfg"])
    cfg.run_dir = str(tmp_path / "run")
    path, info = tg.write_artifact(trained["model"], cfg, dist1(), quiet_log(tmp_path / "log"))
    assert Path(path) == tmp_path / "run" / "model.hqa" and Path(path).exists()
    assert info["bytes_model"] == Path(path).stat().st_size
    here = Path(tg.__file__).parent
    assert info["bytes_code"] == tg.code_bytes() == len(packing.pack_script(here, tg.CODE_FILES))  # the packed script
    assert info["bytes_code_source"] == sum((here / f).stat().st_size for f in tg.CODE_FILES) > info["bytes_code"]
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


@pytest.mark.parametrize("prefix", [b"", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", ha.MAGIC])
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
            blob = ha.compress(blob, "zstd")
        elif wrap == "after_magic":  # a pickle where the header should be, with a valid checksum
            body = ha.MAGIC + len(blob).to_bytes(4, "little") + blob
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
    body = ha.MAGIC + len(hj).to_bytes(4, "little") + hj + payload[12 + hl:-32]
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
    _refused(ha.compress(_forge(artifact["payload"], FORGERIES[name]), "zstd"), tmp_path)


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


# ---------------------------------------------------------------------------------------------------
# the whole header table is validated before decoding (issue 21.6): a forged header with a recomputed
# checksum is refused or loads bit-identical weights, and the rANS decode is bounded by the header
# ---------------------------------------------------------------------------------------------------


def _bits(sd):
    """Each tensor as its raw bits (torch.equal would let -0.0 pass for 0.0 and fail NaN for NaN)."""
    return {k: (tuple(v.shape), v.dtype, v.contiguous().view(torch.int32)) for k, v in sd.items()}


def _refused_or_identical(data: bytes, ref_bits) -> str:
    try:
        _, sd = tg.parse_artifact(data, "forged.hqa")
    except tg.InputError as e:
        assert "forged.hqa" in str(e)
        return "refused"
    got = _bits(sd)
    assert set(got) == set(ref_bits), "loaded a different set of tensors"
    for k, (shape, dtype, bits) in ref_bits.items():
        assert got[k][:2] == (shape, dtype) and torch.equal(got[k][2], bits), f"{k} loaded different weights"
    return "identical"


@pytest.fixture(scope="module")
def ref_bits(artifact):
    return _bits(tg.parse_artifact(artifact["payload"], "ref")[1])


def _fp16(h, nbytes=None, k=0):
    """The k-th fp16 tensor (with `nbytes` bytes, if given)."""
    return [t for t in h["tensors"] if "offset" in t and nbytes in (None, t["bytes"])][k]


def _quant(h, k=0):
    return [t for t in h["tensors"] if "alphabet" in t][k]


def _swap(a, b, key):
    a[key], b[key] = b[key], a[key]


SILENT_FORGERIES = {  # each loaded wrong weights without a word before the table was validated
    "fp16_offset_shifted": lambda h: _fp16(h, 128).__setitem__("offset", _fp16(h, 128)["offset"] + 2),
    "fp16_offset_shifted_back": lambda h: _fp16(h, 128, 1).__setitem__("offset", _fp16(h, 128, 1)["offset"] - 2),
    "two_tensors_one_offset": lambda h: _fp16(h, 128, 1).__setitem__("offset", _fp16(h, 128, 0)["offset"]),
    "offsets_swapped": lambda h: _swap(_fp16(h, 128, 0), _fp16(h, 128, 1), "offset"),
    "names_swapped": lambda h: _swap(_fp16(h, 128, 0), _fp16(h, 128, 1), "name"),
    "scale_offset_shifted": lambda h: _quant(h).__setitem__("scale_offset", _quant(h)["scale_offset"] + 2),
    "scale_offsets_swapped": lambda h: _swap(_quant(h, 0), _quant(h, 2), "scale_offset"),
    "alphabet_halved": lambda h: _quant(h).__setitem__("alphabet", _quant(h)["alphabet"] // 2),
    "alphabet_doubled": lambda h: _quant(h).__setitem__("alphabet", _quant(h)["alphabet"] * 2),
}
SLOPPY_FORGERIES = {  # ignored before (the loader read what it needed), caught only after decoding (shapes)
    # or crashing (duplicate: IndexError); refused now before decoding: the table must add up
    "fp16_shape_transposed": lambda h: _fp16(h, 256).__setitem__("shape", _fp16(h, 256)["shape"][::-1]),
    "quantized_shape_transposed": lambda h: _quant(h, 1).__setitem__("shape", _quant(h, 1)["shape"][::-1]),
    "fp16_bytes_wrong": lambda h: _fp16(h, 128).__setitem__("bytes", 130),
    "scale_bytes_wrong": lambda h: _quant(h).__setitem__("scale_bytes", _quant(h)["scale_bytes"] - 2),
    "rans_bytes_short": lambda h: h.__setitem__("rans_bytes", h["rans_bytes"] - 1),
    "offset_as_float": lambda h: _fp16(h).__setitem__("offset", float(_fp16(h)["offset"])),
    "alphabet_as_string": lambda h: _quant(h).__setitem__("alphabet", str(_quant(h)["alphabet"])),
    "extra_field": lambda h: _fp16(h).__setitem__("alphabet", 5),
    "duplicate_tensor": lambda h: h["tensors"].append(dict(h["tensors"][-1])),
}


def test_silent_forgeries_loaded_wrong_weights_unchecked(artifact, ref_bits, monkeypatch):
    """The forgeries below are not vacuous: without the table checks (the header trusted as it is, the
    stream only capped in its total) each one loads different weights without an error."""
    real = rc.decode_many
    monkeypatch.setattr(ha, "check_table", _unchecked_table)
    monkeypatch.setattr(tg, "check_artifact_model", lambda *a: None)
    monkeypatch.setattr(rc, "decode_many", lambda data, max_symbols, **k: real(data, max_symbols))
    for name, edit in SILENT_FORGERIES.items():
        with pytest.raises(AssertionError, match="different"):
            _refused_or_identical(_forge(artifact["payload"], edit), ref_bits)


def _unchecked_table(header, blob_len):
    """What the loader used to trust: the header's fields as they are."""
    table = [(t["name"], t["shape"], t.get("alphabet"), t.get("scale_offset", t.get("offset"))) for t in header["tensors"]]
    return table, [(t[2], math.prod(t[1])) for t in table if t[2] is not None], 0, 0


@pytest.mark.parametrize("name", sorted(SILENT_FORGERIES) + sorted(SLOPPY_FORGERIES))
def test_forged_table_is_refused(artifact, tmp_path, name):
    edit = {**SILENT_FORGERIES, **SLOPPY_FORGERIES}[name]
    msg = _refused(_forge(artifact["payload"], edit), tmp_path)
    assert "malformed artifact" in msg


def _mutation(draw, h):
    """One random edit of a valid header; returns a label for the failure report."""
    tensors = h["tensors"]
    i, j = draw(st.integers(0, len(tensors) - 1)), draw(st.integers(0, len(tensors) - 1))
    t, u = tensors[i], tensors[j]
    delta = draw(st.sampled_from([-4096, -130, -64, -2, -1, 1, 2, 64, 130, 4096]) | st.integers(-10**6, 10**6))
    junk = draw(st.sampled_from([0, 1, 2, 4, 5, 16, 32, 64, 255, 256, 257, 2**32, -1, 2.0, True, None, "5", [], [1]])
                | st.integers(-2**40, 2**40))
    kind = draw(st.sampled_from(["shift", "set", "copy", "swap", "shape", "rans", "drop_key", "entries"]))
    if kind == "shift":  # move an offset / change a length or alphabet
        key = draw(st.sampled_from(sorted(k for k in t if k not in ("name", "shape"))))
        t[key] += delta
    elif kind == "set":
        key = draw(st.sampled_from(sorted(t) + ["alphabet", "offset"]))
        t[key] = junk
    elif kind == "copy":  # e.g. two tensors on one offset, a duplicated name or alphabet
        key = draw(st.sampled_from(sorted(set(t) & set(u))))
        t[key] = copy.deepcopy(u[key])
    elif kind == "swap":
        key = draw(st.sampled_from(sorted(set(t) & set(u))))
        t[key], u[key] = u[key], t[key]
    elif kind == "shape":
        s = t["shape"]
        how = draw(st.sampled_from(["reverse", "grow", "append", "prepend", "drop"]))
        if how == "reverse":
            s.reverse()
        elif how == "grow" and s:
            k = draw(st.integers(0, len(s) - 1))
            s[k] = s[k] + delta
        elif how == "append":
            s.append(draw(st.sampled_from([1, 2, 1 << 30])))
        elif how == "prepend":
            s.insert(0, draw(st.sampled_from([1, 2, 1 << 30])))
        elif s:
            s.pop(draw(st.integers(0, len(s) - 1)))
    elif kind == "rans":
        key = draw(st.sampled_from(["rans_offset", "rans_bytes"]))
        h[key] = h[key] + delta if draw(st.booleans()) else junk
    elif kind == "drop_key":
        key = draw(st.sampled_from(sorted(t)))
        del t[key]
    else:
        how = draw(st.sampled_from(["swap", "drop", "duplicate"]))
        if how == "swap":
            tensors[i], tensors[j] = tensors[j], tensors[i]
        elif how == "drop":
            tensors.pop(i)
        else:
            tensors.insert(j, copy.deepcopy(t))
    return f"{kind} on tensor {i} ({t.get('name')!r}), {j}; delta {delta}, junk {junk!r}"


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_mutated_header_is_refused_or_loads_identical_weights(artifact, ref_bits, data):
    payload = artifact["payload"]
    hl = int.from_bytes(payload[8:12], "little")
    header = json.loads(payload[12:12 + hl])
    label = _mutation(data.draw, header)
    forged = _forge(payload, lambda h: (h.clear(), h.update(header)))
    data.draw(st.just(label), label="mutation")
    _refused_or_identical(forged, ref_bits)


def _constant_stream(alphabet: int, count: int) -> bytes:
    """A valid rANS stream of `count` copies of symbol 0: a table and one idle lane, a few dozen bytes
    whatever the count (the format's constant arrays are not coded)."""
    def varint(v):
        out = bytearray()
        while v >= 0x80:
            out.append(v & 0x7F | 0x80)
            v >>= 7
        return bytes(out + bytes([v]))
    bitmap = bytearray((alphabet + 7) // 8)
    bitmap[0] = 1
    body = (b"rANS\x01" + varint(1) + bytes([alphabet - 1]) + varint(count) + bytes(bitmap)
            + (rc.M - 1).to_bytes(2, "little") + varint(1) + varint(0) + rc.L.to_bytes(8, "little"))
    return body + zlib.crc32(body).to_bytes(4, "little")


def test_constant_stream_helper_is_a_valid_stream():
    (out,) = rc.decode_many(_constant_stream(5, 1000))
    assert out.shape == (1000,) and not out.any()


def test_tiny_file_claiming_a_billion_symbols_is_refused_before_decoding(trained, monkeypatch):
    """A ~600-byte artifact whose header declares one quantized [1, 2**30] tensor and whose rANS stream
    agrees: it used to decode 2**30 symbols (then 4 GB of float32) before the shapes were compared.
    Now the table is refused before any decode is attempted, in well under a second."""
    import rans_codec
    n = 1 << 30
    stream = _constant_stream(5, n)
    header = {"format": 1, "config": {k: getattr(trained["cfg"], k) for k in tg.MODEL_FIELDS},
              "tensors": [{"name": "w", "shape": [1, n], "alphabet": 5, "scale_offset": 0, "scale_bytes": 2}],
              "rans_offset": 2, "rans_bytes": len(stream)}
    hj = json.dumps(header).encode()
    body = ha.MAGIC + len(hj).to_bytes(4, "little") + hj + b"\x00\x3c" + stream
    data = body + hashlib.sha256(body).digest()
    assert len(data) < 700

    def no_decode(*a, **k):
        raise AssertionError(f"decode attempted (max_symbols {a[1] if len(a) > 1 else k.get('max_symbols')})")
    monkeypatch.setattr(rans_codec, "decode_many", no_decode)
    t = time.perf_counter()
    with pytest.raises(tg.InputError, match="malformed artifact"):
        tg.parse_artifact(data, "tiny.hqa")
    assert time.perf_counter() - t < 1.0


def test_stream_claiming_more_symbols_than_the_header_is_refused_before_allocating(artifact, monkeypatch):
    """A valid header whose rANS stream is swapped for a tiny one claiming 2**32 symbols (checksum
    recomputed): the stream's table is compared with the header's before anything is allocated."""
    payload = artifact["payload"]
    hl = int.from_bytes(payload[8:12], "little")
    header = json.loads(payload[12:12 + hl])
    a = header["tensors"][[i for i, t in enumerate(header["tensors"]) if "alphabet" in t][0]]["alphabet"]
    stream = _constant_stream(a, (1 << 32) - 1)
    header["rans_bytes"] = len(stream)
    hj = json.dumps(header).encode()
    body = ha.MAGIC + len(hj).to_bytes(4, "little") + hj + payload[12 + hl:12 + hl + header["rans_offset"]] + stream
    allocs = []
    real_empty = np.empty
    monkeypatch.setattr(np, "empty", lambda n, *a, **k: allocs.append(n) or real_empty(n, *a, **k))
    t = time.perf_counter()
    with pytest.raises(tg.InputError, match="malformed artifact"):
        tg.parse_artifact(body + hashlib.sha256(body).digest(), "x.hqa")
    assert time.perf_counter() - t < 2.0
    assert not [n for n in allocs if isinstance(n, int) and n > 1 << 24], allocs


def test_forged_huge_rope_is_refused_before_building_the_model(artifact, tmp_path, monkeypatch):
    """MODEL_DIM = ROPE_DIMS = 2**20 in a forged config: the model's rope tables (built on the CPU even
    under the meta device) would take 12 GB; the table's dimensions refuse the config first."""
    real = tg.rope_tables
    monkeypatch.setattr(tg, "rope_tables", lambda n, dims, dev: real(n, dims, dev) if dims <= 4096
                        else pytest.fail(f"rope tables of {n} x {dims} built"))
    big = {"model_dim": 1 << 20, "rope_dims": 1 << 20, "num_heads": 1, "num_kv_heads": 1}
    _refused(_forge(artifact["payload"], lambda h: h["config"].update(big)), tmp_path)


def test_eval_settings_travel_and_older_artifacts_record_none(trained, artifact):
    """--eval-only scores an artifact with the eval settings its run used: the header records them (checked
    like any config value); an artifact written before they were recorded reports none, not made-up ones."""
    evals = {}
    tg.parse_artifact(artifact["payload"], "x", evals)
    assert set(evals) == set(tg.EVAL_FIELDS) and evals["eval_stride"] == trained["cfg"].eval_stride
    evals = {}
    tg.parse_artifact(_forge(artifact["payload"], lambda h: [h["config"].pop(k) for k in tg.EVAL_FIELDS]), "x", evals)
    assert evals == {}
    with pytest.raises(tg.InputError):
        tg.parse_artifact(_forge(artifact["payload"], lambda h: h["config"].__setitem__("slot", "sideways")), "x")


# ---------------------------------------------------------------------------------------------------
# GPTQ export (GPTQ=1): error-compensated levels at quantize_rows' scales, the same format and loader
# ---------------------------------------------------------------------------------------------------


def _layer(alphabet, seed=0, rows=24, cols=40, n=1500):
    """A random layer and correlated inputs (a random mixing of white noise) for it: calibration and held out."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g)
    X, X_test = (torch.randn(n, cols, generator=g) @ mix for _ in range(2))
    W = torch.randn(rows, cols, generator=g) * 0.1
    return W, X, X_test


def _err(X, W, q, s, a):
    return float((X @ (W - tg.dequantize_rows(q, s, a)).T).pow(2).sum())


@pytest.mark.parametrize("alphabet", [tg.INT4, tg.INT6, tg.PENT])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(alphabet, act_order):
    W, X, X_test = _layer(alphabet)
    q_rtn, s = tg.quantize_rows(W, alphabet)
    q = hq_gptq.gptq_levels(W, alphabet, s, X.T @ X, act_order=act_order)
    assert _err(X, W, q, s, alphabet) < 0.8 * _err(X, W, q_rtn, s, alphabet)  # the objective it minimises
    assert _err(X_test, W, q, s, alphabet) < _err(X_test, W, q_rtn, s, alphabet)  # and on inputs it never saw
    lo, hi = hq_gptq.level_range(alphabet)
    assert torch.equal(q, q.round()) and q.min() >= lo and q.max() <= hi and q.dtype == torch.float32
    assert (lo, hi) == ((-2, 2) if alphabet == tg.PENT else (-alphabet // 2, alphabet // 2 - 1))
    assert q.min() == lo or q.max() == hi  # the whole range is in use (a clamp that cut it short would fail)


@pytest.mark.parametrize("alphabet", tg.ALPHABETS)
def test_gptq_dequantizes_exactly_as_the_loader(alphabet):
    W, X, _ = _layer(alphabet, seed=1)
    q_rtn, s = tg.quantize_rows(W, alphabet)
    q = hq_gptq.gptq_levels(W, alphabet, s, X.T @ X)
    for levels in (q, q_rtn):
        assert torch.equal(levels * hq_gptq.row_step(s, alphabet), tg.dequantize_rows(levels, s, alphabet))


def test_gptq_dead_inputs_round_plainly_and_shared_inputs_solve_as_one():
    W, X, _ = _layer(tg.INT4, seed=2)
    X[:, [3, 17]] = 0  # inputs no calibration token reached
    H = X.T @ X
    q_rtn, s = tg.quantize_rows(W, tg.INT4)
    q = hq_gptq.gptq_levels(W, tg.INT4, s, H)
    assert torch.isfinite(q).all()
    nearest = torch.clamp(torch.round(W[:, [3, 17]] / (s.float() / 8)), -8, 7)
    assert torch.equal(q[:, [3, 17]], nearest)
    W2 = torch.randn(8, W.size(1), generator=torch.Generator().manual_seed(5))
    q2_rtn, s2 = tg.quantize_rows(W2, tg.PENT)
    both = hq_gptq.gptq_shared(H, [(W, tg.INT4, s), (W2, tg.PENT, s2)])
    assert torch.equal(both[0], q) and torch.equal(both[1], hq_gptq.gptq_levels(W2, tg.PENT, s2, H))
    assert torch.equal(hq_gptq.gptq_levels(torch.zeros(4, W.size(1)), tg.PENT, torch.zeros(4, 1).half(), H),
                       torch.zeros(4, W.size(1)))  # an all-zero row: scale 0, level 0


def test_hessians_sum_each_modules_inputs_over_batches_and_reruns():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)
    model = torch.nn.Sequential(a, b)
    batches = [torch.randn(2, 4, 6), torch.randn(3, 4, 6)]

    def forward(m, x):
        m(x)
        a(x)  # a second run of one module adds its input again (recurrence)
    H = hq_gptq.collect_hessians(model, [("a", a), ("b", b)], batches, forward)
    xs = torch.cat([x.reshape(-1, 6) for x in batches])
    torch.testing.assert_close(H["a"], 2 * xs.T @ xs)
    with torch.no_grad():
        ys = a(xs)
    torch.testing.assert_close(H["b"], ys.T @ ys)
    assert not a._forward_pre_hooks and not b._forward_pre_hooks  # the hooks are gone
    calls = []

    def next_batches():
        calls.append(1)
        return [torch.zeros(3, 2), torch.ones(3, 2)]
    got = list(hq_gptq.first_rows(next_batches, 7))
    assert [x.size(0) for x in got] == [3, 3, 1] and len(calls) == 2


@pytest.fixture(scope="module")
def gptq_run(tmp_path_factory):
    """A smoke run with GPTQ=1 (its calibration: 8 training sequences), its artifact written and loaded."""
    run = tmp_path_factory.mktemp("gptq")
    cfg = smoke_cfg(run, iterations=4, warmdown_iters=2, save_every=0, gptq=1, gptq_calib_seqs=8, compressor="zstd")
    log = quiet_log(run / "train.log")
    model, info = tg.train(cfg, dist1(), log)
    path, _ = tg.write_artifact(model, cfg, dist1(), log, info["gptq"])
    loaded, _ = tg.load_artifact(path, torch.device("cpu"))
    return {"cfg": cfg, "model": model.eval(), "levels": info["gptq"], "loaded": loaded.eval(),
            "log": (run / "train.log").read_text()}


def test_gptq_run_round_trips_exactly_the_gptq_weights(gptq_run, ids):
    model, cfg, levels, loaded = gptq_run["model"], gptq_run["cfg"], gptq_run["levels"], gptq_run["loaded"]
    lins = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, tg.QATLinear)}
    assert set(levels) == set(lins)
    ref = qat_reference(model, cfg)  # round to nearest, as the QAT forward sees it
    rtn = copy.deepcopy(ref)
    ref.set_quantized(False)
    changed = 0
    with torch.no_grad():
        for k, p in ref.named_parameters():
            if k in lins:
                q_rtn, s = tg.quantize_rows(p.detach(), lins[k].alphabet)
                lo, hi = hq_gptq.level_range(lins[k].alphabet)
                assert levels[k].shape == p.shape and levels[k].min() >= lo and levels[k].max() <= hi
                changed += int((levels[k] != q_rtn).sum())
                p.copy_(tg.dequantize_rows(levels[k], s, lins[k].alphabet))
        sd = loaded.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
        a, b = ref.logits(ref.hidden(ids)), loaded.logits(loaded.hidden(ids))
        assert torch.equal(a, b) and not torch.equal(a, rtn.logits(rtn.hidden(ids)))
    assert changed > 0
    assert "gptq: calib_seqs:8 tokens:1024 hessian:" in gptq_run["log"] and "WARNING" not in gptq_run["log"]


def test_gptq_stores_quantize_rows_scales_and_leaves_the_format_alone(gptq_run):
    model, cfg, levels = gptq_run["model"], gptq_run["cfg"], gptq_run["levels"]
    payload, table = tg.build_artifact(model, cfg, levels)
    plain, plain_table = tg.build_artifact(model, cfg)
    header = lambda p: json.loads(p[12:12 + int.from_bytes(p[8:12], "little")])  # noqa: E731
    h, h0 = header(payload), header(plain)
    assert h["config"] == h0["config"] and not any(k.startswith(("gptq", "qat")) for k in h["config"])
    assert [{k: v for k, v in e.items() if k != "offset"} for e in h["tensors"]] == \
           [{k: v for k, v in e.items() if k != "offset"} for e in h0["tensors"]]
    assert [g for g, *_ in table] == [g for g, *_ in plain_table]
    off = len(ha.MAGIC) + 4 + int.from_bytes(payload[8:12], "little")
    for e in h["tensors"]:
        if "alphabet" in e:  # the stored fp16 row scales are quantize_rows' own
            w = model.state_dict()[e["name"]].float()
            got = np.frombuffer(payload[off + e["scale_offset"]:off + e["scale_offset"] + e["scale_bytes"]], "<f2")
            assert np.array_equal(got, tg.quantize_rows(w, e["alphabet"])[1].numpy().ravel()), e["name"]
