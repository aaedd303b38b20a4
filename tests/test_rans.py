"""Tests for rans_codec: round trips, normalization, size, robustness."""
import os
import sys
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import rans_codec as rc  # noqa: E402
from rans_codec import RansError, decode, decode_many, encode, encode_many  # noqa: E402

FAST = settings(deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow])


def quantized(alphabet, n, seed=0):
    """Symbols shaped like quantized weights: Gaussian rows, per-row absmax
    int-N rounding (2**b - 1 levels), or pentanary thresholds at 0.7/1.4 mean|w|."""
    w = np.random.default_rng(seed).standard_normal((n // 1024, 1024), dtype=np.float32)
    if alphabet == 5:
        a, t = np.abs(w), np.abs(w).mean()
        return (np.sign(w) * ((a > 0.7 * t).astype(np.int8) + (a > 1.4 * t)) + 2).astype(np.uint8).ravel()
    h = alphabet // 2 - 1
    s = np.abs(w).max(axis=1, keepdims=True) / h
    return (np.clip(np.round(w / s), -h, h) + h).astype(np.uint8).ravel()


def hist(x, alphabet):
    # chunked: bincount widens to int64, which would cost 1 GB for 2**27 symbols
    step = 1 << 22
    return sum((np.bincount(x[i:i + step], minlength=alphabet) for i in range(0, x.size, step)),
               np.zeros(alphabet, np.int64))


def entropy_bits(x, alphabet):
    c = hist(x, alphabet)
    c = c[c > 0]
    return float(-(c * np.log2(c / x.size)).sum())


def table_bytes(x, alphabet):
    """Header allowance for one array: fixed fields plus bitmap and freqs."""
    return 32 + (alphabet + 7) // 8 + 2 * np.count_nonzero(hist(x, alphabet))


def roundtrip(x, alphabet, **kw):
    y = decode(encode(x, alphabet, **kw))
    assert y.dtype == np.uint8 and y.ndim == 1
    np.testing.assert_array_equal(y, np.asarray(x).reshape(-1))
    return y


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("alphabet", [1, 2, 5, 256])
def test_empty(alphabet):
    roundtrip(np.zeros(0, np.uint8), alphabet)
    roundtrip([], alphabet)


@pytest.mark.parametrize("alphabet,sym", [(1, 0), (5, 4), (256, 255), (256, 0)])
def test_one_symbol(alphabet, sym):
    roundtrip(np.array([sym]), alphabet)


def test_alphabet_one_and_single_distinct_symbol_cost_no_payload():
    for n in (1, 10, 100_000, 3_000_000):
        roundtrip(np.zeros(n, np.uint8), 1)
        roundtrip(np.full(n, 3), 7)
        # only the count varint grows
        assert len(encode(np.full(n, 3), 7)) <= len(encode([3], 7)) + 3


def test_dominant_symbol():
    rng = np.random.default_rng(1)
    x = np.where(rng.random(300_000) < 0.9999, 2, rng.integers(0, 5, 300_000))
    roundtrip(x, 5)


def test_absent_symbols():
    x = np.random.default_rng(2).choice([0, 7, 200], 50_000, p=[0.5, 0.3, 0.2])
    roundtrip(x, 256)


def test_alphabet_256_all_present():
    rng = np.random.default_rng(3)
    x = np.concatenate([np.arange(256), rng.integers(0, 256, 30_000)]).astype(np.uint8)
    roundtrip(x, 256)
    roundtrip(rng.permutation(x), 256, lanes=1)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int32, np.int64, np.uint64, bool])
def test_integer_dtypes_and_shapes(dtype):
    x = np.random.default_rng(4).integers(0, 2, (7, 3, 5)).astype(dtype)
    roundtrip(x, 2)


def test_encode_is_encode_many_of_one():
    x = quantized(16, 8192)
    assert encode(x, 16) == encode_many([(x, 16)])
    assert encode(x, 16, lanes=9) == encode_many([(x, 16)], lanes=9)


def test_lanes_more_than_symbols_and_explicit_lanes():
    x = quantized(32, 4096)
    sizes = {lanes: len(encode(x, 32, lanes=lanes)) for lanes in (1, 2, 3, 64, 4096, 1 << 20)}
    for lanes in sizes:
        roundtrip(x, 32, lanes=lanes)
    assert sizes[1 << 20] == sizes[4096]  # clamped to the symbol count
    roundtrip(x[:3], 32, lanes=1000)


def test_many_mixed_with_empty_members_and_border_steps():
    rng = np.random.default_rng(5)
    arrays = [(rng.integers(0, a, n), a)
              for n, a in [(0, 5), (5, 5), (0, 256), (100, 16), (1, 1), (0, 1), (77, 64), (3000, 32), (0, 2)]]
    for lanes in (None, 1, 7, 64, 4096):
        out = decode_many(encode_many(arrays, lanes=lanes))
        assert len(out) == len(arrays)
        for (x, _), y in zip(arrays, out):
            assert y.dtype == np.uint8
            np.testing.assert_array_equal(x, y)
    assert decode_many(encode_many([])) == []


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 3000), alphabet=st.integers(1, 256),
       skew=st.floats(0.0, 8.0), lanes=st.one_of(st.none(), st.integers(1, 300)))
def test_roundtrip_random(seed, n, alphabet, skew, lanes):
    rng = np.random.default_rng(seed)
    p = rng.random(alphabet) ** skew + 1e-12 * (rng.random(alphabet) < 0.5)
    x = rng.choice(alphabet, n, p=p / p.sum())
    roundtrip(x, alphabet, lanes=lanes)


@FAST
@given(seed=st.integers(0, 2**32 - 1),
       shape=st.lists(st.tuples(st.integers(0, 600), st.integers(1, 256)), max_size=8),
       lanes=st.one_of(st.none(), st.integers(1, 100)))
def test_roundtrip_many_random(seed, shape, lanes):
    rng = np.random.default_rng(seed)
    arrays = [(rng.integers(0, a, n) % rng.integers(1, a + 1), a) for n, a in shape]
    out = decode_many(encode_many(arrays, lanes=lanes))
    assert len(out) == len(arrays)
    for (x, _), y in zip(arrays, out):
        np.testing.assert_array_equal(x, y)


def test_2_pow_27_symbols():
    rng = np.random.default_rng(6)
    n = 1 << 27
    x = rng.integers(0, 16, n, dtype=np.uint8) & rng.integers(0, 16, n, dtype=np.uint8)
    t = time.perf_counter()
    data = encode(x, 16)
    y = decode(data)
    assert np.array_equal(x, y)
    assert len(data) * 8 <= entropy_bits(x, 16) * 1.002 + 8 * table_bytes(x, 16)
    assert time.perf_counter() - t < 90


# ------------------------------------------------------------- normalization

def check_freqs(counts):
    f = rc.normalize_freqs(counts)
    c = np.asarray(counts)
    assert f.shape == c.shape
    if c.sum() == 0:
        assert not f.any()
        return f
    assert f.sum() == rc.M
    assert (f[c > 0] >= 1).all() and (f[c == 0] == 0).all()
    return f


@pytest.mark.parametrize("counts", [[100000, 1, 1, 1, 100000], [300000, 1, 1], [1, 1, 300000],
                                    [0, 5, 0], [0, 0], [1] * 256, [10**12] + [1] * 255,
                                    [1, 0] * 128, [65535, 1], [3, 65533, 0, 1]])
def test_normalize_edge_histograms(counts):
    f = check_freqs(counts)
    roundtrip(np.repeat(np.arange(len(counts)), np.minimum(counts, 400_000)), len(counts))
    if counts == [0, 5, 0]:
        assert f.tolist() == [0, rc.M, 0]


def test_normalize_rejects_negative():
    with pytest.raises(RansError):
        rc.normalize_freqs([3, -1])


@FAST
@given(st.lists(st.one_of(st.just(0), st.integers(0, 10), st.integers(0, 10**9)), min_size=1, max_size=256))
def test_normalize_property(counts):
    check_freqs(counts)


def test_normalize_close_to_proportional():
    c = np.array([500_000, 300_000, 150_000, 49_000, 999, 1])
    f = check_freqs(c)
    assert np.all(np.abs(f - c * rc.M / c.sum()) <= 1.0)


# ----------------------------------------------------------------------- size

@pytest.fixture(scope="module")
def realistic():
    return {a: quantized(a, 1 << 20, seed=a) for a in (5, 16, 32, 64)}


@pytest.mark.parametrize("alphabet", [5, 16, 32, 64])
def test_size_vs_entropy(realistic, alphabet):
    x = realistic[alphabet]
    data = encode(x, alphabet)
    assert len(data) * 8 <= entropy_bits(x, alphabet) * 1.003 + 8 * table_bytes(x, alphabet)
    roundtrip(x, alphabet)


def test_size_many_vs_entropy(realistic):
    arrays = [(x[: (i + 1) * 131072], a) for i, (a, x) in enumerate(realistic.items())]
    bits = sum(entropy_bits(x, a) for x, a in arrays)
    allowance = sum(table_bytes(x, a) for x, a in arrays)
    assert len(encode_many(arrays)) * 8 <= bits * 1.003 + 8 * allowance


@pytest.mark.parametrize("alphabet", [5, 16, 32, 64])
def test_size_vs_constriction(realistic, alphabet):
    constriction = pytest.importorskip("constriction")
    x = realistic[alphabet]
    p = np.bincount(x, minlength=alphabet).astype(np.float64)
    model = constriction.stream.model.Categorical(p / p.sum(), perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(x.astype(np.int32), model)
    theirs = coder.get_compressed().nbytes
    assert len(encode(x, alphabet)) <= theirs * 1.005


# ----------------------------------------------------------------- robustness

@pytest.fixture(scope="module")
def small_stream():
    x = quantized(16, 2048, seed=9)[:300]
    arrays = [(x, 16), (x[:50] % 5, 5), (np.zeros(0), 3)]
    return encode_many(arrays, lanes=4), arrays


def test_every_truncation(small_stream):
    data, _ = small_stream
    for k in range(len(data)):
        with pytest.raises(RansError):
            decode_many(data[:k])
    with pytest.raises(RansError):
        decode_many(data + b"\0")


def test_every_single_bit_flip(small_stream):
    data, _ = small_stream
    for i in range(len(data) * 8):
        bad = bytearray(data)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(RansError):
            decode_many(bytes(bad))


def parse_layout(data):
    """Walk the documented format independently of the decoder."""
    pos = 5

    def varint():
        nonlocal pos
        v = shift = 0
        while True:
            b = data[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return v

    assert data[:5] == b"rANS\x01"
    arrays = []
    for _ in range(varint()):
        a = data[pos] + 1
        pos += 1
        count = varint()
        present = np.unpackbits(np.frombuffer(data[pos:pos + (a + 7) // 8], np.uint8), bitorder="little")[:a]
        pos += (a + 7) // 8
        f = np.zeros(a, np.int64)
        f[present == 1] = np.frombuffer(data[pos:pos + 2 * present.sum()], "<u2").astype(np.int64) + 1
        pos += 2 * int(present.sum())
        arrays.append((a, count, f))
    lanes, n_words = varint(), varint()
    assert pos + 8 * lanes + 4 * n_words + 4 == len(data)
    assert zlib.crc32(data[:-4]) == int.from_bytes(data[-4:], "little")
    return arrays, lanes, n_words, pos


def test_format_layout(small_stream):
    data, arrays = small_stream
    parsed, lanes, n_words, body = parse_layout(data)
    assert lanes == 4 and n_words > 0
    for (x, a), (pa, count, f) in zip(arrays, parsed):
        assert (pa, count) == (a, x.size)
        if x.size:
            assert f.sum() == rc.M
            np.testing.assert_array_equal(f, rc.normalize_freqs(np.bincount(x.astype(np.int64), minlength=a)))
    # encode sets aside no more than the documented table bytes
    assert body <= 16 + sum(table_bytes(x.astype(np.uint8), a) - 32 for x, a in arrays)


def test_bit_flips_in_body_caught_without_crc(small_stream):
    """The coder's own end-state check catches damage to states/words with a valid CRC."""
    data, _ = small_stream
    body = parse_layout(data)[3]
    for i in range(body * 8, (len(data) - 4) * 8):
        bad = bytearray(data[:-4])
        bad[i // 8] ^= 1 << (i % 8)
        bad += zlib.crc32(bad).to_bytes(4, "little")
        with pytest.raises(RansError):
            decode_many(bytes(bad))


@FAST
@given(st.binary(max_size=300))
def test_random_bytes(blob):
    for data in (blob, b"rANS\x01" + blob):
        with pytest.raises(RansError):
            decode_many(data)


@FAST
@given(pos=st.integers(5, 44), val=st.integers(0, 255), extra=st.binary(max_size=4))
def test_header_garbage_with_valid_crc(small_stream, pos, val, extra):
    """Mutated headers that still pass the CRC: RansError or a valid decode, nothing else."""
    data, _ = small_stream
    body = bytearray(data[:-4])
    body[pos] = val
    body[pos:pos] = extra
    body += zlib.crc32(body).to_bytes(4, "little")
    try:
        out = decode_many(bytes(body))
    except RansError:
        return
    assert all(isinstance(y, np.ndarray) and y.dtype == np.uint8 for y in out)


def test_decode_wrong_types():
    for bad in (None, "rANS", 12, [1, 2]):
        with pytest.raises(RansError):
            decode(bad)
    with pytest.raises(RansError):
        decode(encode_many([([1], 2), ([1], 2)]))
    with pytest.raises(RansError):
        decode(encode_many([]))


# --------------------------------------------------------------- bad input

@pytest.mark.parametrize("alphabet", [0, -1, 257, 1000, 2.0, True, "5", None, 5.5])
def test_bad_alphabet(alphabet):
    with pytest.raises(RansError):
        encode(np.zeros(3, np.uint8), alphabet)


@pytest.mark.parametrize("x,alphabet", [([0, 5], 5), ([-1, 0], 5), ([256], 256), (np.array([2**40]), 256),
                                        (np.array([300], np.uint16), 256), ([1, 2, 3], 3)])
def test_out_of_range(x, alphabet):
    with pytest.raises(RansError, match="range"):
        encode(x, alphabet)


@pytest.mark.parametrize("x", [np.array([0.0, 1.0]), np.array([1.5]), np.array(["a"]),
                               np.array([1, None], dtype=object), [[1, 2], [3]]])
def test_bad_dtype(x):
    with pytest.raises(RansError):
        encode(x, 4)


@pytest.mark.parametrize("lanes", [0, -3, 1.5, True, (1 << 20) + 1, "4"])
def test_bad_lanes(lanes):
    with pytest.raises(RansError):
        encode([1, 2], 4, lanes=lanes)


@pytest.mark.parametrize("arrays", [[np.zeros(3)], [(np.zeros(3, np.uint8),)], 5, [(1, 2, 3)]])
def test_bad_many(arrays):
    with pytest.raises(RansError):
        encode_many(arrays)


def test_decode_many_honours_max_symbols():
    data = encode_many([(np.arange(100) % 5, 5), (np.zeros(50, np.uint8), 3)])
    assert sum(len(a) for a in decode_many(data, max_symbols=150)) == 150
    with pytest.raises(RansError, match="too many symbols"):
        decode_many(data, max_symbols=149)


def _constant_stream(alphabet, count):
    """A valid stream of `count` zeros in a few dozen bytes (constant arrays are not coded)."""
    v, cnt = bytearray(), count
    while cnt >= 0x80:
        v.append(cnt & 0x7F | 0x80)
        cnt >>= 7
    v.append(cnt)
    bitmap = bytearray((alphabet + 7) // 8)
    bitmap[0] = 1
    body = (b"rANS\x01\x01" + bytes([alphabet - 1]) + bytes(v) + bytes(bitmap) + (rc.M - 1).to_bytes(2, "little")
            + b"\x01\x00" + rc.L.to_bytes(8, "little"))
    return body + zlib.crc32(body).to_bytes(4, "little")


def test_decode_many_expect_exact_arrays():
    arrays = [(np.arange(100) % 5, 5), (np.zeros(50, np.uint8), 3), (np.arange(7) % 2, 256)]
    data = encode_many(arrays)
    out = decode_many(data, expect=[(5, 100), (3, 50), (256, 7)])
    assert all(np.array_equal(y, np.asarray(x).astype(np.uint8)) for y, (x, _) in zip(out, arrays))
    for bad in ([(5, 100), (3, 50)], [(5, 100), (3, 50), (256, 7), (2, 1)], [(5, 100), (4, 50), (256, 7)],
                [(5, 99), (3, 51), (256, 7)], [(6, 100), (3, 50), (256, 7)]):
        with pytest.raises(RansError):
            decode_many(data, expect=bad)
    for bad in (5, [(1,)], [("x", 2)], [(None, 3)]):
        with pytest.raises(RansError, match="expect"):
            decode_many(data, expect=bad)


def test_claimed_billions_of_symbols_refused_before_allocating(monkeypatch):
    """A 30-byte stream claiming 2**32 - 1 symbols: refused on its header by expect and max_symbols,
    without a large allocation (decode() of it unbounded would fill 4 GB)."""
    n = (1 << 32) - 1
    data = _constant_stream(5, n)
    assert len(data) < 40
    assert np.array_equal(decode_many(_constant_stream(5, 1000))[0], np.zeros(1000, np.uint8))
    allocs = []
    real_empty = np.empty
    monkeypatch.setattr(np, "empty", lambda s, *a, **k: allocs.append(s) or real_empty(s, *a, **k))
    t = time.perf_counter()
    with pytest.raises(RansError, match="expected alphabet 5 with 1000"):
        decode_many(data, expect=[(5, 1000)])
    with pytest.raises(RansError, match="too many symbols"):
        decode_many(data, max_symbols=1000)
    assert time.perf_counter() - t < 1.0 and not allocs


def test_decode_many_max_steps():
    """max_steps caps the decode loop (coded symbols per lane): a stream with few lanes for many
    symbols (cheap to forge: near-constant data costs almost no words) is refused on its header;
    encode's automatic lanes always fit MAX_STEPS."""
    x = (np.arange(40_000) % 97 == 0).astype(np.uint8)  # low entropy: auto lanes from the step cap
    data = encode_many([(x, 2)])
    assert np.array_equal(decode_many(data, max_steps=rc.MAX_STEPS)[0], x)
    with pytest.raises(RansError, match="steps"):  # decode_many(one_lane) alone would take 40k steps
        decode_many(encode_many([(x, 2)], lanes=1), max_steps=rc.MAX_STEPS)
    assert np.array_equal(decode_many(encode_many([(x, 2)], lanes=3), max_steps=-(-x.size // 3))[0], x)
    with pytest.raises(RansError, match="steps"):
        decode_many(encode_many([(x, 2)], lanes=3), max_steps=-(-x.size // 3) - 1)
