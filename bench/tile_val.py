"""A synthetic val shard of a given length: the proxy val stream repeated, for timing the full eval at the official
size on one GPU. 8xH100 scores 62,021,632 targets, 7,752,704 per rank; timing one rank's share (or a fraction
of it, scaled linearly) on one GPU gives the 8-GPU eval time, since ranks split every phase evenly.

  python bench/tile_val.py SRC_VAL_SHARD DEST_DIR N_TARGETS
"""
import sys
from pathlib import Path

import numpy as np

MAGIC, VERSION = 20240520, 1


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        sys.exit("usage: python bench/tile_val.py SRC_VAL_SHARD DEST_DIR N_TARGETS")
    src, dest, n = Path(args[0]), Path(args[1]), int(args[2])
    if not src.is_file() or n < 1:
        sys.exit(f"error: {src} is not a file, or N_TARGETS < 1")
    header = np.fromfile(src, dtype="<i4", count=256)
    if header[0] != MAGIC or header[1] != VERSION:
        sys.exit(f"error: {src}: not a shard")
    toks = np.fromfile(src, dtype="<u2", offset=1024, count=int(header[2]))
    out = np.resize(toks, n + 1)  # n targets need n + 1 tokens
    header = header.copy()
    header[2] = len(out)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "fineweb_val_000000.bin.tmp"
    with open(tmp, "wb") as f:
        f.write(header.astype("<i4").tobytes())
        f.write(out.astype("<u2").tobytes())
    tmp.rename(dest / "fineweb_val_000000.bin")
    print(f"{dest / 'fineweb_val_000000.bin'}: {len(out)} tokens ({n} targets), {len(out) / len(toks):.2f}x {src.name}")


if __name__ == "__main__":
    main()
