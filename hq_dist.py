"""Distributed context and logging for train_gpt.py: the rank, world and device with the collectives the run
uses (Dist, init_dist), rank-0 logging (Log), crash-safe file writes and run folders that hold one run each.
Counted code (train_gpt.CODE_FILES)."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


class InputError(Exception):
    """A problem with what the user gave us (path, flag, shard, artifact): reported without a traceback."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    host_group: object = None  # gloo, for host-side values: agreeing on them must not wait for the GPU streams

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op)
        return t

    def agree_max(self, x: float) -> float:
        """The largest of the ranks' host-side values (the wall clock), without a GPU synchronization."""
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return t.item()

    def agree(self, check, main_only: bool = False):
        """check() on every rank (rank 0 alone if main_only); an input error on any one is raised on all: none hangs."""
        out, errs = None, [""] * self.world
        try:
            out = check() if self.main or not main_only else None
        except (InputError, OSError) as e:
            errs[self.rank] = str(e)
        if self.world > 1:
            dist.all_gather_object(errs, errs[self.rank], group=self.host_group)
        if any(errs):
            raise InputError(next(e for e in errs if e))
        return out


def init_dist() -> Dist:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(0, 1, torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, world, device, dist.new_group(backend="gloo"))


class Log:
    """Rank 0 prints and appends to <run_dir>/<name>; other ranks stay quiet."""

    def __init__(self, d: Dist, path: str | None):
        self.d, self.path = d, path
        if d.main and path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        if not self.d.main:
            return
        print(msg, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temp file then rename, so a crash never leaves a half-written file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


RUN_FILES = ("train.log", "ckpt_step*.pt", "model.pt", "model.hqa", "submission.json", "eval.log", "nll*.npy")


def claim_run_dir(run_dir: str, names: tuple, overwrite: bool) -> str:
    """A run folder holds one run: refuses one that holds files of ours (names: glob patterns) unless overwrite,
    which removes them; removes atomic_write's temp files (NAME.tmpPID) whose writer has exited. Returns a log line."""
    old = [p for n in names for p in sorted(Path(run_dir).glob(n)) if p.is_file()]
    if old and not overwrite:
        shown = ", ".join(p.name for p in old[:3]) + (", ..." if len(old) > 3 else "")
        how = "--resume CKPT to continue it or --overwrite" if "train.log" in names else "--overwrite"
        raise InputError(f"run folder {run_dir} already holds a run ({shown}); use {how} to replace it")
    orphans = [p for p in Path(run_dir).glob("*.tmp*") if p.is_file() and not pid_alive(p.name.rpartition(".tmp")[2])]
    for p in old + orphans:
        p.unlink()
    removed = f" overwrite_removed:{','.join(p.name for p in old)}" if old else ""
    return f"run_dir:{run_dir} orphan_temp_files_removed:{len(orphans)}{removed}"


def pid_alive(pid: str) -> bool:
    """Whether the writer of a NAME.tmpPID temp file still runs (a name not of that form: kept, as if it did)."""
    try:
        return not pid.isdigit() or int(pid) == 0 or os.kill(int(pid), 0) is None  # signal 0: does it exist?
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # alive under another user; too big to be a pid
        return True
