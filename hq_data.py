"""Data (rules §2.2): shards in the competition format, checked, and read as one cyclic token stream that
each rank slices the same way for any world size. Counted code (train_gpt.CODE_FILES)."""
from __future__ import annotations

import copy
import glob
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from hq_dist import Dist, InputError

if TYPE_CHECKING:  # annotations only: train_gpt imports this module
    from train_gpt import Config


SHARD_MAGIC, SHARD_VERSION, HEADER_BYTES = 20240520, 1, 1024


def shard_tokens(path: str, vocab_size: int, check_ids: bool = True) -> np.ndarray:
    """Memory-map one shard after checking header, size and (optionally) the token id range."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=256)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if header.size < 256:
        raise InputError(f"{path}: truncated header ({size} bytes, need {HEADER_BYTES})")
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise InputError(f"{path}: bad magic/version {header[0]}/{header[1]} (expected {SHARD_MAGIC}/{SHARD_VERSION})")
    n = int(header[2])
    if size != HEADER_BYTES + 2 * n:
        raise InputError(f"{path}: size {size} bytes but header says {n} tokens (expected {HEADER_BYTES + 2 * n} bytes)")
    if n == 0:
        raise InputError(f"{path}: holds no tokens")
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    if check_ids:
        top = max(int(tokens[i:i + (1 << 24)].max()) for i in range(0, n, 1 << 24))
        if top >= vocab_size:
            bad = int(np.argmax(tokens >= vocab_size))
            raise InputError(f"{path}: token id {int(tokens[bad])} at position {bad} is >= vocab size {vocab_size}")
    return tokens


def shard_files(data_path: str, split: str) -> list[str]:
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    files = sorted(glob.glob(pattern))
    if not files:
        raise InputError(f"no {split} shards: {pattern} matches nothing")
    return files


def check_shards(files: list[str], vocab_size: int, d: Dist) -> None:
    """Validate every shard before training; each rank reads its share, then all learn of any error."""
    d.agree(lambda: [shard_tokens(path, vocab_size) for path in files[d.rank::d.world]])


class TokenStream:
    """All train shards as one cyclic token stream; the position (shard, offset) is the loader state."""

    def __init__(self, files: list[str], vocab_size: int):
        self.files, self.vocab_size = files, vocab_size
        self.shard, self.pos = 0, 0
        self._cache: dict[int, np.ndarray] = {}

    def _tokens(self, i: int) -> np.ndarray:
        if i not in self._cache:
            self._cache = {i: shard_tokens(self.files[i], self.vocab_size, check_ids=False)}
        return self._cache[i]

    def read(self, offset: int, n: int) -> np.ndarray:
        """n tokens starting `offset` tokens after the current position (crossing shard ends)."""
        shard, pos = self._walk(self.shard, self.pos, offset)
        out = []
        while n > 0:
            tok = self._tokens(shard)
            k = min(n, len(tok) - pos)
            out.append(np.asarray(tok[pos:pos + k]))
            n -= k
            shard, pos = (shard + 1) % len(self.files), 0
        return np.concatenate(out)

    def advance(self, n: int) -> None:
        self.shard, self.pos = self._walk(self.shard, self.pos, n)

    def _walk(self, shard: int, pos: int, n: int) -> tuple[int, int]:
        while pos + n >= len(self._tokens(shard)):
            n -= len(self._tokens(shard)) - pos
            shard, pos = (shard + 1) % len(self.files), 0
        return shard, pos + n

    def state(self) -> dict:
        return {"shard": self.shard, "pos": self.pos}

    def load_state(self, s: dict) -> None:
        self.shard, self.pos = int(s["shard"]), int(s["pos"])


class TrainLoader:
    """Each step consumes batch_seqs*T contiguous tokens. Sequence j is tokens [j*T, (j+1)*T] of that span;
    micro-step a of rank r takes sequences [(a*W + r)*m, (a*W + r + 1)*m), so the global batch (and thus the
    averaged gradient) is the same for any world size W and micro-batch m."""

    def __init__(self, cfg: Config, d: Dist):
        seqs = cfg.train_batch_tokens // cfg.train_seq_len
        if seqs == 0 or seqs % d.world:
            raise InputError(f"{seqs} sequences of {cfg.train_seq_len} tokens per step (TRAIN_BATCH_TOKENS) do not "
                             f"split evenly over {d.world} ranks")
        # The largest micro-batch within the cap that divides the rank's share: 1 GPU runs 384 sequences as
        # 3 x 128, 2 GPUs 192 as 2 x 96, 8 GPUs 48 as one.
        share = seqs // d.world
        self.T, self.d = cfg.train_seq_len, d
        self.m = max(m for m in range(1, min(cfg.micro_batch_seqs, share) + 1) if share % m == 0)
        self.seqs, self.accum = seqs, seqs // (d.world * self.m)
        self.stream = TokenStream(shard_files(cfg.data_path, "train"), cfg.vocab_size)

        self.pool, self.pending = ThreadPoolExecutor(1), None  # pending: the next step, read ahead

    def _read(self, stream: TokenStream) -> list[torch.Tensor]:
        n, out = self.m * self.T, []
        for a in range(self.accum):
            t = torch.from_numpy(stream.read((a * self.d.world + self.d.rank) * n, n + 1).astype(np.int64))
            out.append(t.pin_memory() if self.d.device.type == "cuda" else t)
        return out

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        host = self.pending.result() if self.pending else self._read(self.stream)
        self.stream.advance(self.seqs * self.T)
        # Read and pin the following step on a worker thread while this one trains: done inline, it left the
        # GPU idle every step (docs/performance.md). The worker reads from its own copy of the
        # stream position, so stream.state() stays that of the consumed data (what checkpoints save).
        self.pending = self.pool.submit(self._read, copy.copy(self.stream))
        out = []
        for t in host:
            t = t.to(self.d.device, non_blocking=True)
            out.append((t[:-1].view(self.m, self.T), t[1:].view(self.m, self.T)))
        return out

    def load_state(self, state: dict) -> None:
        self.stream.load_state(state)
        self.pending = None


def load_val_tokens(cfg: Config) -> np.ndarray:
    return np.concatenate([np.asarray(shard_tokens(f, cfg.vocab_size)) for f in shard_files(cfg.data_path, "val")])
