"""Shared helpers and fixtures for the train_gpt.py CPU test suite.

Every config is built with env={} so the caller's environment never leaks in, every path is absolute
(tests run with cwd = a fresh tmp dir), and every model is tiny (the `smoke` preset or smaller).
"""
import copy
import dataclasses
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hq_data as hd  # noqa: E402
import train_gpt as tg  # noqa: E402

DATA = ROOT / "data" / "datasets" / "fineweb_tiny_sp1024"
TOKENIZER = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"
CPU = torch.device("cpu")

# One thread: bitwise-reproducible CPU kernels, and no oversubscription of the 2-core CI machine.
torch.set_num_threads(1)

# Environment variables train_gpt reads (Config fields as UPPER names, the preset, torchrun's rank vars).
CONFIG_ENV = {f.name.upper() for f in dataclasses.fields(tg.Config)}
LEAKY_ENV = CONFIG_ENV | {"PRESET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                          "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"}


def smoke_cfg(run_dir, **flags) -> tg.Config:
    """The smoke preset on the bundled sample, absolute paths, run_dir under tmp."""
    base = {"data_path": str(DATA), "tokenizer_path": str(TOKENIZER), "run_dir": str(run_dir)}
    base.update(flags)
    return tg.build_config("smoke", flags=base, env={})


def dist1() -> tg.Dist:
    return tg.Dist(0, 1, CPU)


def quiet_log(path=None) -> tg.Log:
    return tg.Log(dist1(), str(path) if path else None)


GOOD = np.arange(2000) % 1024

BAD_SHARDS = {  # name -> (write_shard kwargs, words the message must contain)
    "wrong_magic": (dict(tokens=GOOD, magic=20240521), "bad magic"),
    "wrong_version": (dict(tokens=GOOD, version=7), "bad magic/version"),
    "truncated_tokens": (dict(tokens=GOOD, drop_bytes=2), "header says 2000 tokens"),
    "extra_bytes": (dict(tokens=GOOD, n=1999), "header says 1999 tokens"),
    "truncated_header": (dict(tokens=GOOD, drop_bytes=1024 + 2 * 2000 - 100), "truncated header"),
    "id_out_of_vocab": (dict(tokens=np.where(np.arange(2000) == 1234, 1024, GOOD)), "token id 1024 at position 1234"),
    "no_tokens": (dict(tokens=np.zeros(0, np.int64)), "holds no tokens"),
}


def write_shard(path, tokens, *, magic=hd.SHARD_MAGIC, version=hd.SHARD_VERSION, n=None, drop_bytes=0) -> Path:
    """A shard in the competition format; `n`, `magic`, `version`, `drop_bytes` let tests break it."""
    tokens = np.asarray(tokens)
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = magic, version, len(tokens) if n is None else n
    data = header.tobytes() + tokens.astype("<u2").tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:len(data) - drop_bytes] if drop_bytes else data)
    return path


def val_tokens(n: int) -> np.ndarray:
    """The first n tokens of the bundled val shard (real text, so models have something to learn)."""
    return np.array(hd.shard_tokens(str(DATA / "fineweb_val_000000.bin"), 1024)[:n], dtype=np.uint16)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Replace every parameter with N(0, std) noise: the zero-initialized projections otherwise switch
    attention and the MLPs off, which would make causality/legality checks vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def parse_steps(log_text: str) -> dict[int, float]:
    """{step: train_loss} from `step:N/M train_loss:X` lines."""
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"^step:(\d+)/\d+ train_loss:([-\d.naif]+)", log_text, re.M)}


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    """No env var can change a config; cwd is a scratch dir so nothing lands in the repository."""
    for k in list(os.environ):
        if k in LEAKY_ENV:
            monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A smoke model trained 12 steps on the bundled sample (shared; deep-copy before mutating)."""
    run = tmp_path_factory.mktemp("trained")
    cfg = smoke_cfg(run, iterations=12, log_every=1, save_every=0)
    log_path = run / "train.log"
    model, info = tg.train(cfg, dist1(), quiet_log(log_path))
    model.eval()
    return {"cfg": cfg, "model": model, "info": info, "log": log_path.read_text(), "run": run}


@pytest.fixture
def trained_model(trained):
    return copy.deepcopy(trained["model"])


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A data dir with the bundled train shard and a short (8k-token) val shard, for fast CLI runs."""
    d = tmp_path_factory.mktemp("small_data")
    (d / "fineweb_train_000000.bin").symlink_to(DATA / "fineweb_train_000000.bin")
    write_shard(d / "fineweb_val_000000.bin", val_tokens(8193))
    return d
