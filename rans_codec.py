"""Interleaved order-0 rANS coder for quantized weight symbols (numpy only).

API
    encode(symbols, alphabet, lanes=None) -> bytes
    decode(data) -> np.ndarray                      # 1-D uint8; caller reshapes
    encode_many([(symbols, alphabet), ...], lanes=None) -> bytes
    decode_many(data, max_symbols=MAX_SYMBOLS, expect=None, max_steps=None)
                                                    -> list[np.ndarray]   # one 1-D uint8 array per input
    normalize_freqs(counts) -> np.ndarray           # int64 freqs summing to M
    RansError(ValueError)

encode(x, a) is exactly encode_many([(x, a)]). Symbols may be any integer (or
bool) array-like of any shape; they are flattened in C order. 1 <= alphabet <= 256.

Coder: 64-bit states in [L, 2**64) with L = 2**32, probability precision
M = 2**16, 32-bit word I/O, so one coding step moves at most one word per lane.
(A 32-bit state with L = M = 2**16 would be simpler but rounds x / freq so
coarsely right after renormalization that it loses ~0.2%; L / M = 2**16 makes
that loss negligible.) The arrays are concatenated; symbol i goes to lane
i % lanes and every array keeps its own order-0 frequency table. Arrays with a single distinct symbol
are not coded at all (their table says everything). Lanes default to about
total_bits / 64000: each lane costs ~48 bits (stored 64-bit final state minus
the information parked in it, plus the 32 bits of L), which keeps lane
overhead under ~0.1% of the payload; but at least n / 32768 lanes so that
near-constant data does not need an endless Python-level step loop.

Format (little endian, varint = unsigned LEB128):
    b"rANS", u8 version=1, varint n_arrays,
    per array: u8 alphabet-1, varint count, ceil(alphabet/8) bytes bitmap of
        present symbols (bit s%8 of byte s//8), u16 freq-1 per present symbol,
    varint lanes, varint n_words, u64 final state per lane, u32 word stream,
    u32 zlib.crc32 of everything before it.

Guarantees: decode(encode(x, a)) equals x.ravel() as uint8 for every valid
input, including empty arrays and single-symbol data (which costs no payload).
Streams are deterministic and self-contained. Present symbols get freq >= 1,
absent ones 0. At most MAX_SYMBOLS symbols per stream.

Errors: RansError (a ValueError) for every invalid encoder argument (alphabet
not an int in [1, 256], non-integer dtype, symbol out of range, bad lanes, too
many symbols, arrays not (symbols, alphabet) pairs) and every damaged stream
(bad magic/version, CRC mismatch, truncation, trailing bytes, inconsistent
tables, word stream under/overrun, lanes not ending in L, decode() on a
multi-array stream). Single-bit flips are always caught by the CRC; truncation
by the CRC and the exact-length check; the coder's end-state check (every lane
back at L, every word consumed) is a second, independent net. A stream crafted
to carry a valid CRC can still ask for up to MAX_SYMBOLS of work and memory,
unless the caller bounds it: max_symbols caps the total, expect=[(alphabet,
count), ...] demands exactly these arrays, and max_steps caps the coder's
step loop (coded symbols / lanes; encode's automatic lanes keep it at most
MAX_STEPS up to MAX_AUTO_LANES * MAX_STEPS coded symbols). All three are
checked on the stream's header, before anything is allocated or decoded.
"""
import zlib

import numpy as np

__all__ = ["encode", "decode", "encode_many", "decode_many", "normalize_freqs", "RansError"]

PROB_BITS = 16
M = 1 << PROB_BITS          # frequencies sum to M
WORD_BITS = 32
L = 1 << WORD_BITS          # state lower bound; states live in [L, 2**64)
MAGIC, VERSION = b"rANS", 1
LANE_BUDGET_BITS = 64_000   # payload bits per lane: ~48 bits lane cost is < 0.1%
MAX_AUTO_LANES = 1 << 16
MAX_LANES = 1 << 20
MAX_SYMBOLS = 1 << 32
MAX_STEPS = 1 << 15         # cap on auto-lane steps (n / lanes)
BLOCK = 1 << 20             # encoder table lookups are batched over ~this many symbols


class RansError(ValueError):
    """Invalid input to the encoder or an invalid/corrupted stream."""


def normalize_freqs(counts) -> np.ndarray:
    """Integer frequencies summing to M: present symbols >= 1, absent 0.

    Start from floor(count * M / n) (at least 1), then repair the sum one unit
    per symbol and pass where it changes the code length n*H the least.
    A single present symbol gets all of M.
    """
    c = np.asarray(counts, dtype=np.int64)
    if (c < 0).any():
        raise RansError("counts must be non-negative")
    n = int(c.sum())
    if n == 0:
        return np.zeros(c.shape, np.int64)
    present = c > 0
    f = np.where(present, np.maximum(c * M // n, 1), 0)
    cf = c.astype(np.float64)
    while (d := M - int(f.sum())) != 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            if d > 0:    # cost change of +1 is negative: most negative first
                cost = np.where(present, -cf * np.log2((f + 1) / f), np.inf)
            else:        # never take a symbol below 1
                cost = np.where(f > 1, cf * np.log2(f / (f - 1)), np.inf)
        order = np.argsort(cost, kind="stable")[:abs(d)]
        order = order[np.isfinite(cost[order])]
        f[order] += 1 if d > 0 else -1
    return f


def _histogram(x, alphabet) -> np.ndarray:
    # bincount widens its input to intp: chunk it so 2**27 symbols need not cost 1 GB
    c = np.zeros(alphabet, np.int64)
    for i in range(0, x.size, BLOCK):
        c += np.bincount(x[i:i + BLOCK], minlength=alphabet)
    return c


def _code_bits(c, f) -> float:
    nz = c > 0
    return float(np.sum(c[nz] * np.log2(M / f[nz])))


def _symbols(x, alphabet) -> tuple[np.ndarray, int]:
    if isinstance(alphabet, bool) or not isinstance(alphabet, (int, np.integer)):
        raise RansError(f"alphabet must be an int, got {type(alphabet).__name__}")
    alphabet = int(alphabet)
    if not 1 <= alphabet <= 256:
        raise RansError(f"alphabet must be in [1, 256], got {alphabet}")
    try:
        x = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise RansError(f"symbols are not an array: {e}") from None
    x = x.reshape(-1)
    if x.size == 0:
        return np.zeros(0, np.uint8), alphabet
    if x.dtype.kind not in "biu":
        raise RansError(f"symbols must have an integer dtype, got {x.dtype}")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= alphabet:
        raise RansError(f"symbols must be in [0, {alphabet}), got range [{lo}, {hi}]")
    return x.astype(np.uint8, copy=False), alphabet


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


class _Reader:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, k: int) -> memoryview:
        if k < 0 or self.pos + k > len(self.buf):
            raise RansError("truncated stream")
        self.pos += k
        return self.buf[self.pos - k:self.pos]

    def varint(self, limit: int) -> int:
        v = shift = 0
        while True:
            b = self.take(1)[0]
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
            if shift > 63:
                raise RansError("malformed varint")
        if v > limit:
            raise RansError(f"header field {v} exceeds limit {limit}")
        return v


def encode(symbols, alphabet: int, lanes: int | None = None) -> bytes:
    """Encode one array; see the module docstring."""
    return encode_many([(symbols, alphabet)], lanes=lanes)


def encode_many(arrays, lanes: int | None = None) -> bytes:
    """Encode several (symbols, alphabet) pairs into one interleaved stream."""
    try:
        pairs = [(x, a) for x, a in arrays]
    except (TypeError, ValueError):
        raise RansError("arrays must be an iterable of (symbols, alphabet) pairs") from None
    items = [_symbols(x, a) for x, a in pairs]
    n = sum(x.size for x, _ in items)
    if n > MAX_SYMBOLS:
        raise RansError(f"too many symbols: {n} > {MAX_SYMBOLS}")

    head = bytearray(MAGIC + bytes([VERSION]) + _varint(len(items)))
    coded, tabs, bits = [], [], 0.0
    for x, a in items:
        c = _histogram(x, a)
        f = normalize_freqs(c)
        present = f > 0
        head += bytes([a - 1]) + _varint(x.size)
        head += np.packbits(present, bitorder="little").tobytes()
        head += (f[present] - 1).astype("<u2").tobytes()
        if 0 < f.max() < M:  # constant arrays carry no information: not coded at all
            bits += _code_bits(c, f)
            cdf = np.concatenate(([0], np.cumsum(f)[:-1]))
            coded.append(x)
            tabs.append((f.astype(np.uint64), cdf.astype(np.uint64)))
    nc = sum(x.size for x in coded)

    if lanes is None:
        # ~0.1% of the payload, but never so few lanes that low-entropy data
        # needs more than MAX_STEPS (slow, Python-level) steps
        lanes = min(max(int(bits // LANE_BUDGET_BITS), -(-nc // MAX_STEPS), 1), MAX_AUTO_LANES)
    elif isinstance(lanes, bool) or not isinstance(lanes, (int, np.integer)) \
            or not 1 <= lanes <= MAX_LANES:
        raise RansError(f"lanes must be an int in [1, {MAX_LANES}], got {lanes!r}")
    lanes = min(int(lanes), max(nc, 1))  # a lane without symbols is pure overhead

    sym = coded[0] if len(coded) == 1 else np.concatenate([np.zeros(0, np.uint8)] + coded)
    starts = np.concatenate(([0], np.cumsum([x.size for x in coded], dtype=np.int64)))
    states, words = _encode_lanes(sym, starts, tabs, lanes)
    head += _varint(lanes) + _varint(words.size)
    parts = [bytes(head), states.astype("<u8").tobytes(), words.astype("<u4", copy=False).tobytes()]
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return b"".join(parts + [crc.to_bytes(4, "little")])


def _encode_lanes(sym, starts, tabs, N):
    """Run all lanes backwards over the steps; return final states and words.

    Steps are visited last to first so the decoder can go first to last.
    Per step, lanes that must renormalize emit their low word in lane order;
    the step chunks are then concatenated in reverse step order, which is
    exactly the order in which the decoder asks for them.
    """
    n = sym.size
    T = -(-n // N)
    x = np.full(N, L, np.uint64)
    q = np.empty(N, np.uint64)
    m = np.empty(N, bool)
    chunks = []
    per_block = max(1, BLOCK // N)
    blk_lo = None
    for t in range(T - 1, -1, -1):
        s = t * N
        a = min(N, n - s)
        if blk_lo is None or s < blk_lo:
            # Batched table lookups for steps [t - per_block + 1, t]: the step
            # loop then only slices, whatever array each lane's symbol is in.
            blk_lo = max(0, t - per_block + 1) * N
            blk_hi = s + a
            f = np.empty(blk_hi - blk_lo, np.uint64)
            c = np.empty_like(f)
            for k in range(len(tabs)):
                lo, hi = max(starts[k], blk_lo), min(starts[k + 1], blk_hi)
                if lo < hi:
                    f[lo - blk_lo:hi - blk_lo] = tabs[k][0][sym[lo:hi]]
                    c[lo - blk_lo:hi - blk_lo] = tabs[k][1][sym[lo:hi]]
            g = M - f               # C(s, x) = x + (x // f) * (M - f) + cdf
        j = s - blk_lo
        xv, qv, mv = x[:a], q[:a], m[:a]
        fv = f[j:j + a]
        # Renormalize iff x >= f << 48 (written so f = M cannot overflow): then
        # C(s, x) stays below 2**64 and the decoder sees x < L exactly here.
        np.right_shift(xv, 64 - PROB_BITS, out=qv)
        np.greater_equal(qv, fv, out=mv)
        idx = np.flatnonzero(mv)
        if idx.size:
            xi = xv[idx]
            chunks.append(xi.astype(np.uint32))  # wraps: keeps the low word
            xv[idx] = xi >> WORD_BITS
        np.floor_divide(xv, fv, out=qv)
        np.multiply(qv, g[j:j + a], out=qv)
        xv += qv
        xv += c[j:j + a]
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, np.uint32)
    return x, words


def decode(data) -> np.ndarray:
    """Decode a stream holding exactly one array."""
    out = decode_many(data)
    if len(out) != 1:
        raise RansError(f"stream holds {len(out)} arrays; use decode_many")
    return out[0]


def decode_many(data, max_symbols: int = MAX_SYMBOLS, expect=None, max_steps: int | None = None) -> list[np.ndarray]:
    """Decode every array of a stream made by encode_many, in order. A caller that knows how many symbols
    to expect passes max_symbols, so a crafted stream cannot make it allocate more; one that knows the
    arrays passes expect = [(alphabet, count), ...] and the stream must hold exactly those; max_steps
    bounds the decode loop's length (coded symbols per lane). All are checked before any allocation."""
    if expect is not None:
        try:
            expect = [(int(a), int(c)) for a, c in expect]
        except (TypeError, ValueError):
            raise RansError("expect must be a list of (alphabet, count) pairs") from None
    try:
        buf = memoryview(data).cast("B")
    except TypeError:
        raise RansError(f"expected bytes-like data, got {type(data).__name__}") from None
    if len(buf) < len(MAGIC) + 1 + 4 or bytes(buf[:4]) != MAGIC:
        raise RansError("not a rANS stream (bad magic or too short)")
    if buf[4] != VERSION:
        raise RansError(f"unsupported version {buf[4]}")
    if zlib.crc32(buf[:-4]) != int.from_bytes(buf[-4:], "little"):
        raise RansError("CRC mismatch: stream is corrupted or truncated")

    r = _Reader(buf[:-4])
    r.pos = 5
    K = r.varint(len(buf))  # each array needs at least two header bytes
    if expect is not None and K != len(expect):
        raise RansError(f"stream holds {K} arrays, expected {len(expect)}")
    arrays, total = [], 0
    for i in range(K):
        a = r.take(1)[0] + 1
        cnt = r.varint(MAX_SYMBOLS)
        if expect is not None and (a, cnt) != expect[i]:
            raise RansError(f"array {i}: alphabet {a} with {cnt} symbols, expected alphabet {expect[i][0]} "
                            f"with {expect[i][1]}")
        present = np.unpackbits(np.frombuffer(r.take((a + 7) // 8), np.uint8),
                                bitorder="little")
        if present[a:].any():
            raise RansError("symbol bitmap marks symbols outside the alphabet")
        present = present[:a].astype(bool)
        k = int(present.sum())
        f = np.zeros(a, np.int64)
        f[present] = np.frombuffer(r.take(2 * k), "<u2").astype(np.int64) + 1
        if (cnt > 0) != (k > 0) or (cnt > 0 and f.sum() != M):
            raise RansError("inconsistent frequency table")
        total += cnt
        if total > min(max_symbols, MAX_SYMBOLS):
            raise RansError(f"too many symbols (more than {min(max_symbols, MAX_SYMBOLS)})")
        arrays.append((cnt, f))
    # constant arrays (f == M) were not coded: their table says everything
    n_coded = sum(cnt for cnt, f in arrays if 0 < f.max() < M)
    N = r.varint(min(MAX_LANES, max(n_coded, 1)))
    if N == 0:
        raise RansError("zero lanes")
    if max_steps is not None and -(-n_coded // N) > max_steps:
        raise RansError(f"{n_coded} coded symbols on {N} lanes take more than {max_steps} steps")
    W = r.varint(len(buf))
    # astype copies: native order and alignment keep the hot loop fast
    states = np.frombuffer(r.take(8 * N), "<u8").astype(np.uint64)
    words = np.frombuffer(r.take(4 * W), "<u4").astype(np.uint32)
    if r.pos != len(r.buf):
        raise RansError("trailing bytes after word stream")
    if (states < L).any():
        raise RansError("lane state below L")
    # allocate only now that the header is known to be consistent
    outs = [np.empty(cnt, np.uint8) for cnt, _ in arrays]
    coded = [(cnt, f, out) for (cnt, f), out in zip(arrays, outs) if 0 < f.max() < M]
    for (cnt, f), out in zip(arrays, outs):
        if f.max() == M:
            out[:] = f.argmax()
    _decode_lanes(states, words, [c for c, _, _ in coded],
                  [_decode_table(f) for _, f, _ in coded], [o for _, _, o in coded])
    return outs


def _decode_table(f):
    """Per-slot symbol, freq and bias = slot - cdf[symbol] (uint32 halves cache use)."""
    sym = np.repeat(np.arange(f.size, dtype=np.uint8), f)
    cdf = np.concatenate(([0], np.cumsum(f)[:-1]))
    return sym, f[sym].astype(np.uint32), (np.arange(M) - cdf[sym]).astype(np.uint32)


def _decode_lanes(x, words, counts, tabs, outs):
    N, W, n = x.size, words.size, sum(counts)
    ends = np.cumsum(counts).tolist()
    slot = np.empty(N, np.int64)
    fb = np.empty(N, np.uint32)
    bb = np.empty(N, np.uint32)
    m = np.empty(N, bool)
    k = pos = 0
    for s in range(0, n, N):
        a = min(N, n - s)
        lo = 0
        while lo < a:  # a step spans more than one array only at array borders
            while ends[k] <= s + lo:
                k += 1
            hi = min(a, ends[k] - s)
            sym, ftab, btab = tabs[k]
            xv, sv, fv, bv = x[lo:hi], slot[:hi - lo], fb[:hi - lo], bb[:hi - lo]
            base = ends[k] - counts[k]
            np.bitwise_and(xv, M - 1, out=sv)
            np.take(sym, sv, out=outs[k][s + lo - base:s + hi - base])
            np.take(ftab, sv, out=fv)
            np.take(btab, sv, out=bv)
            xv >>= PROB_BITS
            xv *= fv
            xv += bv
            lo = hi
        xv, mv = x[:a], m[:a]
        np.less(xv, L, out=mv)
        idx = np.flatnonzero(mv)
        if idx.size:
            if pos + idx.size > W:
                raise RansError("word stream exhausted: stream is corrupted")
            xv[idx] = (xv[idx] << WORD_BITS) | words[pos:pos + idx.size]
            pos += idx.size
    if pos != W or (x != L).any():
        raise RansError("lanes did not end in the initial state: stream is corrupted")
