"""Size and speed of rans_codec on quantized-weight-like symbols, one CPU core.

    python bench/bench_rans.py [--n SYMBOLS] [--quick] [--sweep]

MB = 1e6 symbols. Compares with constriction (AnsCoder + Categorical of the
empirical distribution), lzma preset 9|EXTREME and zstd level 22 on the raw
uint8 symbols, then encodes a simulated 31.7 M-symbol model (66 tensors) with
encode_many. --sweep also times the model at several lane counts.
"""
import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[var] = "1"  # before numpy is imported

import argparse  # noqa: E402
import lzma  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rans_codec as rc  # noqa: E402

try:
    import constriction
except ImportError:
    constriction = None
try:
    import zstandard
except ImportError:
    zstandard = None

# One block of the simulated model: (symbols, alphabet) for q, k, v, o, mlp fc, mlp proj.
BLOCK = [(262144, 32), (131072, 32), (131072, 64), (262144, 64), (1048576, 5), (1048576, 16)]


def quantized(alphabet, n, seed=0):
    """Gaussian rows of 1024, per-row absmax int-N rounding (2**b - 1 levels),
    or pentanary thresholds at 0.7 / 1.4 * mean|w| for alphabet 5."""
    w = np.random.default_rng(seed).standard_normal((max(n // 1024, 1), 1024), dtype=np.float32)
    if alphabet == 5:
        a, t = np.abs(w), np.abs(w).mean()
        q = np.sign(w) * ((a > 0.7 * t).astype(np.int8) + (a > 1.4 * t)) + 2
    else:
        h = alphabet // 2 - 1
        q = np.clip(np.round(w / (np.abs(w).max(axis=1, keepdims=True) / h)), -h, h) + h
    return q.astype(np.uint8).ravel()[:n]


def entropy_bits(x, alphabet):
    c = np.bincount(x, minlength=alphabet)
    c = c[c > 0]
    return float(-(c * np.log2(c / x.size)).sum())


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def coders(alphabet):
    """name -> (encode(x) -> opaque, size_bytes(opaque), decode(opaque, n) -> x, repeats)."""
    out = {"rans": (lambda x: rc.encode(x, alphabet), len, lambda d, n: rc.decode(d), 3)}
    if constriction is not None:
        def c_enc(x):
            p = np.bincount(x, minlength=alphabet).astype(np.float64)
            model = constriction.stream.model.Categorical(p / p.sum(), perfect=False)
            coder = constriction.stream.stack.AnsCoder()
            coder.encode_reverse(x.astype(np.int32), model)
            return coder.get_compressed(), model  # model travels out of band: no table cost

        def c_dec(d, n):
            return constriction.stream.stack.AnsCoder(d[0]).decode(d[1], n)
        out["constriction"] = (c_enc, lambda d: d[0].nbytes, c_dec, 3)
    out["lzma-9e"] = (lambda x: lzma.compress(x.tobytes(), preset=9 | lzma.PRESET_EXTREME), len,
                      lambda d, n: np.frombuffer(lzma.decompress(d), np.uint8), 1)
    if zstandard is not None:
        out["zstd-22"] = (lambda x: zstandard.ZstdCompressor(level=22).compress(x.tobytes()), len,
                          lambda d, n: np.frombuffer(zstandard.ZstdDecompressor().decompress(d), np.uint8), 1)
    return out


def per_alphabet(n):
    print(f"{'alph':>4} {'coder':<13} {'H b/sym':>8} {'b/sym':>8} {'over %':>8} {'enc MB/s':>9} {'dec MB/s':>9}")
    for alphabet in (5, 16, 32, 64):
        x = quantized(alphabet, n, seed=alphabet)
        h = entropy_bits(x, alphabet) / n
        for name, (enc, size, dec, rep) in coders(alphabet).items():
            d, te = timed(lambda: enc(x), rep)
            y, td = timed(lambda: dec(d, n), rep)
            assert np.array_equal(np.asarray(y).astype(np.uint8), x), name
            b = size(d) * 8 / n
            print(f"{alphabet:>4} {name:<13} {h:8.4f} {b:8.4f} {100 * (b / h - 1):8.3f} "
                  f"{n / te / 1e6:9.2f} {n / td / 1e6:9.2f}")


def model(layers, lanes=None, quiet=False):
    arrays = [(quantized(a, n, seed=1000 + i), a) for i, (n, a) in enumerate(BLOCK * layers)]
    n = sum(x.size for x, _ in arrays)
    h = sum(entropy_bits(x, a) for x, a in arrays)
    d, te = timed(lambda: rc.encode_many(arrays, lanes=lanes), 2)
    ys, td = timed(lambda: rc.decode_many(d), 3)
    assert all(np.array_equal(x, y) for (x, _), y in zip(arrays, ys))
    print(f"model {len(arrays)} tensors, {n:,} symbols, lanes={lanes or 'auto'}: encode {te:.3f} s, "
          f"decode {td:.3f} s, {len(d):,} bytes = {len(d) * 8 / n:.4f} b/sym vs entropy "
          f"{h / n:.4f} (+{100 * (len(d) * 8 / h - 1):.3f}%, {len(d) - h / 8:,.0f} bytes over)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1 << 21, help="symbols per alphabet (default 2**21)")
    ap.add_argument("--quick", action="store_true", help="2**18 symbols per alphabet, 2-layer model")
    ap.add_argument("--sweep", action="store_true", help="also time the model at several lane counts")
    args = ap.parse_args()
    n, layers = (1 << 18, 2) if args.quick else (args.n, 11)
    print(f"numpy {np.__version__}, constriction {'yes' if constriction else 'no'}, "
          f"zstandard {'yes' if zstandard else 'no'}; single-threaded\n")
    per_alphabet(n)
    print()
    model(layers)
    if args.sweep:
        for lanes in (256, 512, 1024, 2048, 4096, 8192):
            model(layers, lanes)


if __name__ == "__main__":
    main()
