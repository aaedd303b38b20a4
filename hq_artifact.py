"""The artifact container (spec §4): bytes and numpy arrays only; it knows no model (train_gpt.py does).

Layout: MAGIC, u32 header length, the JSON header, the blobs, SHA-256 of everything before it; then lzma-9e
(xz) or zstd-22. The header is {"format": 1, "config": {...}, "tensors": [...], "rans_offset", "rans_bytes"};
each tensor is fp16 values {name, shape, offset, bytes} or quantized {name, shape, alphabet, scale_offset,
scale_bytes}: per-row fp16 scales here, its symbols in the one rANS stream (rans_codec) that ends the blob.

API
    pack(tensors, config, quantize, group) -> (payload, size table)
    compress(payload, method) -> bytes;  decompress(data) -> payload (bounded by MAX_PAYLOAD)
    check_table(header, blob_len) -> (table, expect, dim_cap, total)
    parse(data, make_config, check_model, wrap=()) -> (config, {name: array or (alphabet, levels, scales)})
    ArtifactError: every refusal, its message without the file's path
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np

import rans_codec

MAGIC = b"HQGPT61\x00"
MAX_PAYLOAD = 1 << 30  # refuse to decompress beyond this (a hostile file could otherwise fill memory)


class ArtifactError(Exception):
    """Not an artifact, or a malformed one (the caller adds the path)."""


def pack(tensors, config: dict, quantize, group) -> tuple[bytes, list]:
    """tensors: [(name, float32 array, alphabet or None)]; quantize(w, alphabet) -> (uint8 symbols of w's shape,
    fp16 per-row scales); group(name, alphabet) names a quantized tensor's row in the size table.
    Returns the uncompressed payload and the per-group size table [(group, params, bits/weight, bytes)]."""
    entries, blobs, streams, off = [], [], [], 0
    groups: dict[str, list] = {}  # group -> [params, entropy bits, bytes]
    for name, w, a in tensors:
        if a is not None:
            sym, scale = quantize(w, a)
            streams.append((sym, a))
            raw = scale.astype("<f2").tobytes()
            counts = np.bincount(sym.ravel(), minlength=a)
            f = rans_codec.normalize_freqs(counts)
            bits = float((counts[counts > 0] * np.log2(rans_codec.M / f[counts > 0])).sum())
            g = groups.setdefault(group(name, a), [0, 0.0, 0])
            g[0] += w.size; g[1] += bits; g[2] += len(raw)
            entries.append({"name": name, "shape": list(w.shape), "alphabet": a, "scale_offset": off, "scale_bytes": len(raw)})
        else:
            raw = w.astype("<f2").tobytes()
            g = groups.setdefault("fp16 passthrough", [0, 0.0, 0])
            g[0] += w.size; g[2] += len(raw)
            entries.append({"name": name, "shape": list(w.shape), "offset": off, "bytes": len(raw)})
        blobs.append(raw)
        off += len(raw)
    stream = rans_codec.encode_many(streams)
    blobs.append(stream)
    header = {"format": 1, "config": config, "tensors": entries, "rans_offset": off, "rans_bytes": len(stream)}
    hj = json.dumps(header, separators=(",", ":")).encode()
    body = MAGIC + len(hj).to_bytes(4, "little") + hj + b"".join(blobs)
    payload = body + hashlib.sha256(body).digest()
    total_bits = sum(g[1] for g in groups.values()) or 1.0
    table = []
    for gname, (n, bits, extra) in groups.items():  # stream bytes shared out by each group's code length
        sbytes = len(stream) * bits / total_bits
        table.append((gname, n, (sbytes + extra) * 8 / n, sbytes + extra))
    table.append(("header+framing", 0, 0.0, len(payload) - sum(t[3] for t in table)))
    return payload, table


def compress(payload: bytes, method: str) -> bytes:
    if method == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=22).compress(payload)
    import lzma
    return lzma.compress(payload, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)


def decompress(data: bytes) -> bytes:
    if data[:6] == b"\xfd7zXZ\x00":
        import lzma
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            out = dec.decompress(data, max_length=MAX_PAYLOAD)
        except lzma.LZMAError as e:
            raise ArtifactError(f"corrupted xz data ({e})") from None
        if not dec.eof:
            raise ArtifactError("truncated or oversized xz data")
        return out
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard
        try:
            with zstandard.ZstdDecompressor().stream_reader(data) as r:
                out = r.read(MAX_PAYLOAD + 1)
        except zstandard.ZstdError as e:
            raise ArtifactError(f"corrupted zstd data ({e})") from None
        if len(out) > MAX_PAYLOAD:
            raise ArtifactError(f"zstd payload larger than {MAX_PAYLOAD} bytes")
        return out
    if data[:8] == MAGIC:
        return data
    raise ArtifactError(f"not an artifact (neither xz, zstd nor a raw {MAGIC[:7].decode()} payload)")


def check_table(header: dict, blob_len: int) -> tuple[list[tuple], list[tuple[int, int]], int, int]:
    """Validates the tensor table before anything is decoded (a valid checksum is no MAC: a forged header can
    carry one): known fields, unique names, integer dimensions, at most MAX_PAYLOAD weights, bytes = numel * 2
    (fp16), scale_bytes = rows * 2 (quantized: 2-D, alphabet 2..256, the codec's range), and the regions (each
    tensor's scales or fp16 values, then the rANS stream) tiling the blob in table order, as pack writes them:
    every region inside the blob, none overlapping another, no offset moved or swapped. Raises ValueError.
    Returns [(name, shape, alphabet or None, offset)] and the rANS stream's expected [(alphabet, symbols)] in
    table order, the largest dimension a model may take from the table (quantized rows, fp16 dimensions) and
    its weight count."""
    def nat(v, what: str, hi: int = MAX_PAYLOAD) -> int:  # a JSON integer in [0, hi]: no bool, float or string
        if type(v) is not int or not 0 <= v <= hi:
            raise ValueError(f"{what} is {v!r}, not an integer in [0, {hi}]")
        return v
    fp16_keys, q_keys = {"name", "shape", "offset", "bytes"}, {"name", "shape", "alphabet", "scale_offset", "scale_bytes"}
    tensors = header["tensors"]
    if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
        raise ValueError("tensors is not a list of objects")
    table, expect, total, cursor, dim_cap = [], [], 0, 0, 0
    for i, t in enumerate(tensors):
        if set(t) not in (fp16_keys, q_keys):
            raise ValueError(f"tensor {i} has fields {sorted(t)}")
        name, shape = t["name"], t["shape"]
        if not isinstance(name, str) or not isinstance(shape, list):
            raise ValueError(f"tensor {i}: name {name!r} or shape {shape!r} of the wrong type")
        for s in shape:
            nat(s, f"{name}: a dimension")
        n = math.prod(shape)
        total += n
        if total > MAX_PAYLOAD:
            raise ValueError(f"more than {MAX_PAYLOAD} weights")
        if "alphabet" in t:
            a = nat(t["alphabet"], f"{name}: alphabet", 256)
            if a < 2 or len(shape) != 2:
                raise ValueError(f"{name}: alphabet {a} for shape {shape} (needs 2..256 and 2-D)")
            off, length, need = t["scale_offset"], t["scale_bytes"], 2 * shape[0]
            expect.append((a, n))
            dim_cap = max(dim_cap, shape[0])
        else:
            a, off, length, need = None, t["offset"], t["bytes"], 2 * n
            dim_cap = max([dim_cap] + shape)
        nat(off, f"{name}: offset", blob_len)
        if nat(length, f"{name}: byte count", blob_len) != need:
            raise ValueError(f"{name}: {length} bytes, its shape {shape} needs {need}")
        if off != cursor:
            raise ValueError(f"{name}: region at {off}, expected at {cursor} (regions must tile the blob in table order)")
        cursor += length
        if cursor > blob_len:
            raise ValueError(f"{name}: region ends at {cursor}, past the blob's {blob_len} bytes")
        table.append((name, shape, a, off))
    ro, rb = nat(header["rans_offset"], "rans_offset", blob_len), nat(header["rans_bytes"], "rans_bytes", blob_len)
    if ro != cursor or ro + rb != blob_len:
        raise ValueError(f"rANS stream at {ro}+{rb}: expected at {cursor}, ending at the blob's end {blob_len}")
    names = [t[0] for t in table]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    return table, expect, dim_cap, total


def parse(data: bytes, make_config, check_model, wrap: tuple = ()) -> tuple[object, dict]:
    """Checks and decodes an artifact without executing anything from it (JSON + raw arrays only): magic,
    checksum, header, make_config(header's config dict) -> config, check_table, check_model(config, table,
    dim_cap, total), all before anything is decoded; the rANS decode is bounded by what the table declares
    (exact per-tensor alphabets and symbol counts, at most MAX_STEPS steps). Returns the config and, in table
    order, {name: float32 array (fp16 values) or (alphabet, float32 levels centred on 0, fp16 scales [rows, 1])}.
    A ValueError, KeyError, TypeError, RansError or one of `wrap` raised on the way is a malformed artifact."""
    p = decompress(data)
    if len(p) < 44 or p[:8] != MAGIC:
        raise ArtifactError("bad magic")
    if hashlib.sha256(p[:-32]).digest() != p[-32:]:
        raise ArtifactError("checksum mismatch (corrupted or truncated artifact)")
    hl = int.from_bytes(p[8:12], "little")
    try:
        if 12 + hl > len(p) - 32:
            raise ValueError(f"header length {hl} runs past the payload")
        header = json.loads(p[12:12 + hl])
        blob = p[12 + hl:-32]
        if not isinstance(header, dict) or header.get("format") != 1 or not isinstance(header.get("config"), dict):
            raise ValueError("header is not a format-1 object with a config")
        config = make_config(header["config"])
        table, expect, dim_cap, total = check_table(header, len(blob))
        check_model(config, table, dim_cap, total)
        streams = iter(rans_codec.decode_many(blob[header["rans_offset"]:], sum(n for _, n in expect), expect=expect,
                                              max_steps=rans_codec.MAX_STEPS))
        out = {}
        for name, shape, a, off in table:
            if a is not None:
                levels = next(streams).astype(np.float32).reshape(shape) - a // 2
                scale = np.frombuffer(blob, "<f2", count=shape[0], offset=off).astype(np.float16).reshape(-1, 1)
                out[name] = (a, levels, scale)
            else:
                out[name] = np.frombuffer(blob, "<f2", count=math.prod(shape), offset=off).astype(np.float32).reshape(shape)
    except (rans_codec.RansError, ValueError, KeyError, TypeError, *wrap) as e:
        raise ArtifactError(f"malformed artifact ({type(e).__name__}: {e})") from None
    return config, out
