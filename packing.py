"""The submission's code as one self-extracting train_gpt.py, and the records folder around it.

The challenge counts the code in a record's train_gpt.py. `python train_gpt.py --pack DIR` (write_records) writes
records/track_10min_16mb/<name>/-style folder: train_gpt.py, a short stub that holds every counted source
(train_gpt.CODE_FILES: train_gpt.py, its modules, cutlass_mlp.cu) lzma-compressed and base85-encoded;
requirements.txt; README.md and submission.json from the given runs; the runs' logs.

The packed script, run (or imported, or under torchrun), checks the blob against its sha256, refuses a stale pack,
unpacks the sources once into ~/.cache/hqgpt/src-<sha> (temp dir + rename: ranks unpacking at once all end up
with one complete copy), puts that folder first on sys.path and runs train_gpt.py from it as the same module,
with `__packed_file__` set, so code_bytes() counts the packed file. Packing is deterministic (no paths or times
in the output), so the source tree's code_bytes() packs in memory and gets the same bytes.

Stale pack: when a folder above the packed script holds every packed file (the script was packed into its own
source tree, e.g. records/... of this repository), those files are the ones it was packed from; if any differs,
it exits with `error: stale pack: <file> changed since packing` (status 2). Copied anywhere else, it runs.
This module is not packed: a packed run never needs it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0}]  # pb=0: text
MARKER = "# hqgpt-packed-script v1"
BLOB_RE = re.compile(rb'^BLOB = b"([^"]*)"$', re.M)
SHA_RE = re.compile(rb'^SHA256 = "([0-9a-f]{64})"', re.M)


class PackError(Exception):
    """Bad input to --pack (reported as `error: ...`, nothing written)."""


# The packed train_gpt.py: this stub, then the blob. Plain stdlib; keep it short (every byte is counted).
STUB = '''#!/usr/bin/env python3
MARKER
"""HybridQuantGPT v6.1 for OpenAI Parameter Golf, self-extracting (written by `python train_gpt.py --pack DIR`).
BLOB holds NAMES (lzma, base85):
they unpack once into ~/.cache/hqgpt/src-<sha>/, and train_gpt.py runs from there with this script's arguments."""
import base64, hashlib, lzma, os, shutil, sys, tempfile, types
from pathlib import Path

SHA256 = "HASH"


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def sources():
    try:
        raw = lzma.decompress(base64.b85decode(BLOB), lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    except (ValueError, lzma.LZMAError) as e:
        fail(f"corrupt pack: {__file__}: {e}")
    if hashlib.sha256(raw).hexdigest() != SHA256:
        fail(f"corrupt pack: {__file__}: the sources do not match their sha256")
    files, i = {}, 0
    while i < len(raw):  # name, size, bytes
        j = raw.index(b"\\n", i)
        k = raw.index(b"\\n", j + 1)
        n = k + 1 + int(raw[j + 1:k])
        files[raw[i:j].decode()] = raw[k + 1:n]
        i = n
    return files


def check_fresh(files):
    """A folder above this one holding every packed file is the tree it was packed from: it must be unchanged."""
    for root in Path(os.path.realpath(__file__)).parent.parents:
        if all((root / f).is_file() for f in files):
            for f, data in files.items():
                if (root / f).read_bytes() != data:
                    fail(f"stale pack: {root / f} changed since packing (pack again: python train_gpt.py --pack DIR)")
            return


def unpack(files):
    key = "src-" + SHA256[:16]
    same = lambda d: all((d / f).is_file() and (d / f).read_bytes() == b for f, b in files.items())
    for base in (Path.home() / ".cache" / "hqgpt", Path(tempfile.gettempdir()) / f"hqgpt-{os.getuid()}"):
        try:
            if not same(base / key):
                base.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=key + ".", dir=base))
                for f, data in files.items():
                    (tmp / f).write_bytes(data)
                try:
                    os.rename(tmp, base / key)  # atomic; another process may have been first
                except OSError:
                    shutil.rmtree(tmp, ignore_errors=True)
            if same(base / key):
                return base / key
        except OSError:
            pass
    fail(f"cannot unpack the sources into ~/.cache/hqgpt/{key} or the temp dir (remove a damaged copy there)")


BLOB = b"BLOBDATA"
files = sources()
check_fresh(files)
here = unpack(files)
sys.path.insert(0, str(here))
mod = types.ModuleType(__name__)
mod.__file__, mod.__packed_file__ = str(here / "train_gpt.py"), os.path.abspath(__file__)
sys.modules[__name__] = mod
exec(compile(files["train_gpt.py"], mod.__file__, "exec", dont_inherit=True), mod.__dict__)
'''


def container(root: Path, files) -> bytes:
    """The sources as one byte string: name, size, bytes per file, in CODE_FILES' order."""
    out = []
    for f in files:
        data = (Path(root) / f).read_bytes()
        out.append(f.encode() + b"\n" + str(len(data)).encode() + b"\n" + data)
    return b"".join(out)


def pack_script(root: Path, files) -> bytes:
    """The self-extracting train_gpt.py for the sources in root; the same bytes for the same sources."""
    if "train_gpt.py" not in files:
        raise PackError("the packed files must include train_gpt.py")
    raw = container(root, files)
    stub = (STUB.replace("MARKER", MARKER, 1).replace("NAMES", ", ".join(files), 1)
            .replace("HASH", hashlib.sha256(raw).hexdigest(), 1))
    blob = base64.b85encode(lzma.compress(raw, format=lzma.FORMAT_RAW, filters=FILTERS))
    return stub.replace('BLOB = b"BLOBDATA"', 'BLOB = b"' + blob.decode() + '"', 1).encode()


def unpack_script(script: bytes) -> dict[str, bytes]:
    """The sources in a packed train_gpt.py (for checks; the stub does this itself when it runs)."""
    m = BLOB_RE.search(script)
    if not script.startswith(b"#!") or MARKER.encode() not in script[:100] or m is None:
        raise PackError("not a packed train_gpt.py")
    raw = lzma.decompress(base64.b85decode(m.group(1)), lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    files, i = {}, 0
    while i < len(raw):
        j = raw.index(b"\n", i)
        k = raw.index(b"\n", j + 1)
        n = k + 1 + int(raw[j + 1:k])
        files[raw[i:j].decode()] = raw[k + 1:n]
        i = n
    return files


# ----------------------------------------------------------------------------------------------------
# The records folder
# ----------------------------------------------------------------------------------------------------


def read_runs(runs: list[str]) -> list[dict]:
    """Each run folder's submission.json (with the fields the README needs) and train.log; distinct seeds."""
    out, seeds = [], set()
    for r in runs:
        d = Path(r)
        if not d.is_dir():
            raise PackError(f"--pack-runs: {r}: not a folder")
        for f in ("submission.json", "train.log"):
            if not (d / f).is_file():
                raise PackError(f"--pack-runs: {r}: no {f} (a finished training run's folder has both)")
        try:
            sub = json.loads((d / "submission.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise PackError(f"--pack-runs: {d / 'submission.json'}: not JSON ({e})") from None
        missing = [k for k in ("seed", "val_bpb", "val_loss", "bytes_model") if not isinstance(sub.get(k), (int, float))]
        if missing:
            raise PackError(f"--pack-runs: {d / 'submission.json'}: no {', '.join(missing)}")
        if sub["seed"] in seeds:
            raise PackError(f"--pack-runs: seed {sub['seed']} given twice ({r})")
        seeds.add(sub["seed"])
        out.append({"dir": d, "sub": sub})
    return out


def git_describe(root: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    if head.returncode:
        return ""
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackError(f"--pack: {out} exists and is not an empty folder (pick a new one; nothing is overwritten)")


def records_readme(name: str, runs: list[dict], script: bytes, files, source_bytes: int, commit: str,
                   notes: list[str]) -> str:
    sha = hashlib.sha256(script).hexdigest()
    lines = [f"# {name}", ""]
    if runs:
        bpb = sum(r["sub"]["val_bpb"] for r in runs) / len(runs)
        modes = sorted({r["sub"].get("score_mode", "?") for r in runs})
        total = max(r["sub"]["bytes_model"] for r in runs) + len(script)
        lines += [f"val_bpb **{bpb:.8f}** (mean of {len(runs)} seed{'s' * (len(runs) > 1)}, score mode "
                  f"{', '.join(modes)}); largest artifact {total:,} bytes of 16,000,000 (model + this train_gpt.py).",
                  "", "## Results", "",
                  "| seed | val_bpb | val_loss | steps | train s | model bytes | total bytes | log |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in runs:
            s = r["sub"]
            lines.append(f"| {s['seed']} | {s['val_bpb']:.8f} | {s['val_loss']:.8f} | {s.get('steps', '')} | "
                         f"{s.get('wallclock_seconds', '')} | {s['bytes_model']:,} | {s['bytes_model'] + len(script):,} | "
                         f"[{r['log']}]({r['log']}) |")
        commands = sorted({s_cmd(r["sub"]) for r in runs})
        lines += ["", "## Run", "", "From this folder (one run per seed; SEED selects it):", ""]
        lines += [f"    {c}" for c in commands]
        for key, label in (("hardware", "Machine"), ("data_path", "Data"), ("date", "Date")):
            vals = sorted({str(r["sub"].get(key, "?")) for r in runs})
            lines.append(f"\n{label}: {', '.join(vals)}")
    else:
        lines += ["No runs were packed (`--pack-runs RUN,...` adds their results and logs)."]
    lines += ["", "## Code", "",
              f"`train_gpt.py` ({len(script):,} bytes, the counted code) is self-extracting: it holds "
              f"{', '.join(files)} ({source_bytes:,} bytes) lzma-compressed and base85-encoded, unpacks them once "
              f"into `~/.cache/hqgpt/src-<sha>/` and runs train_gpt.py from there. `pip install -r requirements.txt` "
              f"is all it needs.", "",
              f"sha256 of train_gpt.py: `{sha}`" + (f"; packed from commit {commit}." if commit else "")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def s_cmd(sub: dict) -> str:
    """The run's command, as it runs from the records folder."""
    cmd = str(sub.get("command", "train_gpt.py")).split()
    if cmd and cmd[0].endswith("train_gpt.py"):
        cmd[0] = "train_gpt.py"
    seed = f"SEED={sub['seed']} "
    return seed + ("python " + " ".join(cmd) if cmd else "python train_gpt.py")


def write_records(out_dir: str, runs_arg: str | None, root: Path, files) -> str:
    """--pack DIR [--pack-runs RUN,...]: write the records folder (all or nothing); returns a summary line."""
    out = Path(out_dir)
    check_out_dir(out)
    run_list = [] if runs_arg is None else runs_arg.split(",")
    if any(not r.strip() for r in run_list):
        raise PackError(f"--pack-runs: an empty folder name in {runs_arg!r} (give RUN[,RUN...])")
    runs = read_runs([r.strip() for r in run_list])
    script = pack_script(root, files)
    sha = hashlib.sha256(script).hexdigest()
    notes = []
    for r in runs:
        ran = r["sub"].get("code_sha256")
        if ran is not None and ran != sha:
            raise PackError(f"--pack-runs: {r['dir']}: it ran other code than these sources (its code_sha256 "
                            f"{ran[:12]}, theirs {sha[:12]}); pack the sources it ran, or run it again")
        if ran is None:
            notes.append(f"{r['dir'].name} (seed {r['sub']['seed']}) does not record which code it ran "
                         f"(a run from before packing); it was not checked against this train_gpt.py.")
        r["log"] = f"train_seed{r['sub']['seed']}.log"
    source_bytes = sum((Path(root) / f).stat().st_size for f in files)
    name = runs[0]["sub"].get("name", "HybridQuantGPT v6.1") if runs else "HybridQuantGPT v6.1 (clean-room)"
    commit = git_describe(root)

    sub = {"track": "10min_16mb", "name": name, "date": time.strftime("%Y-%m-%d")}
    if runs:
        n = len(runs)
        sub.update({
            "val_bpb": sum(r["sub"]["val_bpb"] for r in runs) / n,
            "val_loss": sum(r["sub"]["val_loss"] for r in runs) / n,
            "score_mode": ",".join(sorted({r["sub"].get("score_mode", "?") for r in runs})),
            "record_legal": all(r["sub"].get("record_legal", False) for r in runs),
            "seed_results": {str(r["sub"]["seed"]): {
                "val_bpb": r["sub"]["val_bpb"], "val_loss": r["sub"]["val_loss"], "steps": r["sub"].get("steps"),
                "wallclock_seconds": r["sub"].get("wallclock_seconds"), "bytes_model": r["sub"]["bytes_model"],
                "bytes_total": r["sub"]["bytes_model"] + len(script), "log": r["log"]} for r in runs},
        })
        sub["mean_val_bpb"], sub["mean_val_loss"] = sub["val_bpb"], sub["val_loss"]
        sub["bytes_model"] = max(r["sub"]["bytes_model"] for r in runs)
        sub["bytes_total"] = sub["bytes_model"] + len(script)
    sub.update({"bytes_code": len(script), "bytes_code_source": source_bytes, "code_sha256": sha})
    if runs:
        for key in ("hardware", "data_path"):
            sub[key] = ", ".join(sorted({str(r["sub"].get(key, "?")) for r in runs}))
        sub["command"] = "; ".join(sorted({s_cmd(r["sub"]) for r in runs}))
    if commit:
        sub["source_commit"] = commit

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.pack-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "train_gpt.py").write_bytes(script)
        os.chmod(tmp / "train_gpt.py", 0o755)
        if (Path(root) / "requirements.txt").is_file():
            shutil.copyfile(Path(root) / "requirements.txt", tmp / "requirements.txt")
        for r in runs:
            shutil.copyfile(r["dir"] / "train.log", tmp / r["log"])
        (tmp / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
        (tmp / "README.md").write_text(records_readme(name, runs, script, files, source_bytes, commit, notes))
        check_out_dir(out)  # still empty or absent
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return (f"packed:{out / 'train_gpt.py'} code:packed:{len(script)} source:{source_bytes} runs:{len(runs)} "
            f"sha256:{sha[:16]}")
