"""`--pack`: the self-extracting train_gpt.py (packing.py) and the records folder around it.

Stub behaviour (unpacking, torchrun-style concurrent unpacking, stale and corrupt packs) is tested on a toy source
tree (no torch: fast); the real tree is packed for the code size, the CLI, stale refusal and the smoke run, whose
scores must be bit-identical to the source's.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LEAKY_ENV, ROOT, TOKENIZER, parse_steps, tg

import packing  # noqa: E402  (conftest put the repository root on sys.path)

TOY = {
    "train_gpt.py": b"import json, sys\nimport helper\n"
                    b"print(json.dumps({'name': __name__, 'file': __file__, 'packed': globals().get('__packed_file__'),"
                    b" 'argv': sys.argv, 'helper': helper.__file__, 'doc': __doc__}))\n",
    "helper.py": b"X = 1\n",
    "data.cu": b"// a non-Python source\n",
}


def env_with_home(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LEAKY_ENV}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def run(script, *args, home, timeout=300, cwd=None):
    return subprocess.run([sys.executable, str(script), *args], env=env_with_home(home), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def toy_tree(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for f, data in TOY.items():
        (root / f).write_bytes(data)
    return root


def toy_pack(root: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(packing.pack_script(root, tuple(TOY)))
    return dest


def cache(home: Path) -> Path:
    return home / ".cache" / "hqgpt"


# ---------------------------------------------------------------------------------------------------
# the packed script
# ---------------------------------------------------------------------------------------------------


def test_pack_is_deterministic_and_holds_every_source():
    a = packing.pack_script(ROOT, tg.CODE_FILES)
    assert a == packing.pack_script(ROOT, tg.CODE_FILES)
    files = packing.unpack_script(a)
    assert list(files) == list(tg.CODE_FILES)
    for f in tg.CODE_FILES:
        assert files[f] == (ROOT / f).read_bytes(), f
    source = sum((ROOT / f).stat().st_size for f in tg.CODE_FILES)
    assert len(a) < source / 2
    assert a.isascii() and b"\0" not in a and b"\r" not in a
    assert str(ROOT).encode() not in a  # nothing about where it was packed
    compile(a, "train_gpt.py", "exec")
    # the counted code is the packed script, from the sources as from the packed file
    sizes = tg.code_sizes()
    assert tg.code_bytes() == sizes["packed"] == len(a) and sizes["source"] == source


def test_packed_script_runs_train_gpt_as_itself(tmp_path):
    root = toy_tree(tmp_path / "src")
    script = toy_pack(root, tmp_path / "elsewhere" / "rec" / "train_gpt.py")
    home = tmp_path / "home"
    for _ in range(2):  # unpacks, then reuses the unpacked copy
        p = run(script, "--flag", "x", home=home, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        unpacked = Path(out["file"]).parent
        assert out["name"] == "__main__" and out["packed"] == str(script) and out["argv"] == [str(script), "--flag", "x"]
        assert unpacked.parent == cache(home) and unpacked.name.startswith("src-")
        assert Path(out["helper"]).parent == unpacked  # `import helper` finds the packed one
        assert sorted(p.name for p in cache(home).iterdir()) == [unpacked.name]  # no temp dir left behind
        for f, data in TOY.items():
            assert (unpacked / f).read_bytes() == data


def test_concurrent_unpacking(tmp_path):
    """torchrun starts every rank at once: each must end up with one complete copy."""
    script = toy_pack(toy_tree(tmp_path / "src"), tmp_path / "rec" / "train_gpt.py")
    home = tmp_path / "home"
    procs = [subprocess.Popen([sys.executable, str(script)], env=env_with_home(home), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({json.loads(o)["file"] for o, _ in outs}) == 1
    assert len(list(cache(home).iterdir())) == 1


def test_a_damaged_unpacked_copy_is_not_used(tmp_path):
    script = toy_pack(toy_tree(tmp_path / "src"), tmp_path / "rec" / "train_gpt.py")
    home = tmp_path / "home"
    first = Path(json.loads(run(script, home=home).stdout)["file"]).parent
    (first / "helper.py").write_text("X = 2  # edited\n")
    p = run(script, home=home)
    assert p.returncode == 0, p.stderr
    again = Path(json.loads(p.stdout)["file"]).parent
    assert again != first and (again / "helper.py").read_bytes() == TOY["helper.py"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "hash"])
def test_corrupt_pack_refuses_to_run(tmp_path, damage):
    script = toy_pack(toy_tree(tmp_path / "src"), tmp_path / "rec" / "train_gpt.py")
    data = script.read_bytes()
    m = packing.BLOB_RE.search(data)
    if damage == "flip":  # a still-valid base85 character, mid-blob
        i = m.start(1) + (m.end(1) - m.start(1)) // 2
        data = data[:i] + (b"0" if data[i:i + 1] != b"0" else b"1") + data[i + 1:]
    elif damage == "truncate":
        data = data[:m.end(1) - 10] + data[m.end(1):]
    else:  # the blob is intact but is not what the hash says
        h = packing.SHA_RE.search(data)
        data = data[:h.start(1)] + b"0" * 64 + data[h.end(1):]
    script.write_bytes(data)
    p = run(script, home=tmp_path / "home")
    assert p.returncode == 2 and p.stderr.startswith("error: corrupt pack:"), (p.returncode, p.stderr)
    assert p.stdout == "" and not (tmp_path / "home" / ".cache").exists()


def test_stale_pack_refuses_to_run(tmp_path):
    root = toy_tree(tmp_path / "src")
    script = toy_pack(root, root / "records" / "track_10min_16mb" / "x" / "train_gpt.py")
    home = tmp_path / "home"
    assert run(script, home=home).returncode == 0  # packed in its source tree, unchanged: runs
    for f in TOY:
        saved = (root / f).read_bytes()
        (root / f).write_bytes(saved + b"\n")
        p = run(script, home=home)
        assert p.returncode == 2, (f, p.stderr)
        assert p.stderr.startswith(f"error: stale pack: {root / f} changed since packing"), p.stderr
        assert p.stdout == ""
        (root / f).write_bytes(saved)
    assert run(script, home=home).returncode == 0
    # outside the tree it was packed from (e.g. the challenge's repository) there is nothing to compare with
    (root / "helper.py").write_text("X = 3\n")
    copy = tmp_path / "challenge" / "records" / "track_10min_16mb" / "x"
    shutil.copytree(script.parent, copy)
    assert run(copy / "train_gpt.py", home=home).returncode == 0


# ---------------------------------------------------------------------------------------------------
# the CLI and the records folder (real sources)
# ---------------------------------------------------------------------------------------------------


def fake_run(d: Path, seed: int, bpb: float, **extra) -> Path:
    d.mkdir(parents=True)
    sub = {"name": "HybridQuantGPT v6.1 (clean-room)", "val_bpb": bpb, "val_loss": bpb * 1.6, "score_mode": "ttt",
           "record_legal": True, "bytes_total": 1, "bytes_code": 1, "bytes_model": 14_000_000 + seed, "steps": 7000,
           "wallclock_seconds": 599.1, "hardware": "8x NVIDIA H100 80GB HBM3", "date": "2026-12-01", "seed": seed,
           "data_path": "./data/datasets/fineweb10B_sp1024", "command": "/x/y/train_gpt.py --preset h100"}
    sub.update(extra)
    (d / "submission.json").write_text(json.dumps(sub))
    (d / "train.log").write_text(f"seed:{seed}\nfinal val_bpb:{bpb}\n")
    return d


def pack_cli(capsys, *args):
    capsys.readouterr()
    try:
        tg.main(["--pack", *args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_pack_writes_a_records_folder(tmp_path, capsys):
    sha = __import__("hashlib").sha256(packing.pack_script(ROOT, tg.CODE_FILES)).hexdigest()
    runs = [fake_run(tmp_path / "runs" / "a", 1337, 1.10, code_sha256=sha), fake_run(tmp_path / "runs" / "b", 42, 1.12)]
    out = tmp_path / "records" / "track_10min_16mb" / "2026-12-05_hqgpt"
    code, stdout, err = pack_cli(capsys, str(out), "--pack-runs", ",".join(map(str, runs)))
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "requirements.txt", "submission.json", "train_gpt.py", "train_seed1337.log",
                     "train_seed42.log"]
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp folder left
    script = (out / "train_gpt.py").read_bytes()
    assert script == packing.pack_script(ROOT, tg.CODE_FILES) and os.access(out / "train_gpt.py", os.X_OK)
    assert f"code:packed:{len(script)} " in stdout
    sub = json.loads((out / "submission.json").read_text())
    assert sub["bytes_code"] == len(script) == tg.code_bytes() and sub["code_sha256"] == sha
    assert sub["bytes_model"] == 14_001_337 and sub["bytes_total"] == 14_001_337 + len(script)
    assert sub["val_bpb"] == pytest.approx(1.11) and sub["track"] == "10min_16mb" and sub["record_legal"]
    assert sub["seed_results"]["42"]["bytes_total"] == 14_000_042 + len(script)
    assert sub["command"] == "SEED=1337 python train_gpt.py --preset h100; SEED=42 python train_gpt.py --preset h100"
    assert (out / "train_seed42.log").read_text() == (runs[1] / "train.log").read_text()
    assert (out / "requirements.txt").read_bytes() == (ROOT / "requirements.txt").read_bytes()
    readme = (out / "README.md").read_text()
    assert "| 1337 | 1.10000000 |" in readme and "| 42 | 1.12000000 |" in readme and "8x NVIDIA H100" in readme
    assert "SEED=42 python train_gpt.py --preset h100" in readme and f"{len(script):,} bytes" in readme
    assert "b (seed 42) does not record which code it ran" in readme  # the run without a code hash


@pytest.mark.parametrize("case", ["nonempty", "missing_run", "no_log", "bad_json", "dup_seed", "other_code",
                                  "runs_without_pack", "with_eval_only", "empty_name"])
def test_pack_refuses_bad_input_before_writing(tmp_path, capsys, case):
    out = tmp_path / "rec"
    runs = tmp_path / "runs"
    args = [str(out)]
    if case == "nonempty":
        out.mkdir()
        (out / "notes.md").write_text("mine")
    elif case == "missing_run":
        args += ["--pack-runs", str(runs / "nope")]
    elif case == "no_log":
        (fake_run(runs / "a", 1, 1.1) / "train.log").unlink()
        args += ["--pack-runs", str(runs / "a")]
    elif case == "bad_json":
        (fake_run(runs / "a", 1, 1.1) / "submission.json").write_text("{")
        args += ["--pack-runs", str(runs / "a")]
    elif case == "dup_seed":
        args += ["--pack-runs", f"{fake_run(runs / 'a', 1, 1.1)},{fake_run(runs / 'b', 1, 1.2)}"]
    elif case == "other_code":
        args += ["--pack-runs", str(fake_run(runs / "a", 1, 1.1, code_sha256="0" * 64))]
    elif case == "runs_without_pack":
        args = None
    elif case == "with_eval_only":
        args += ["--eval-only", "model.hqa"]
    elif case == "empty_name":
        args += ["--pack-runs", f"{fake_run(runs / 'a', 1, 1.1)},"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tg.main(["--pack-runs", str(fake_run(runs / "z", 9, 1.0))] if args is None else ["--pack", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: "), err
    if case == "nonempty":
        assert [p.name for p in out.iterdir()] == ["notes.md"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder either


def source_copy(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for f in (*tg.CODE_FILES, "packing.py", "requirements.txt"):
        shutil.copyfile(ROOT / f, dest / f)
    return dest


def test_stale_pack_of_the_real_sources(tmp_path):
    src = source_copy(tmp_path / "repo")
    home = tmp_path / "home"
    rec = src / "records" / "track_10min_16mb" / "x"
    p = run(src / "train_gpt.py", "--pack", str(rec), home=home, cwd=tmp_path)
    assert p.returncode == 0 and "code:packed:" in p.stdout, p.stderr
    p = run(rec / "train_gpt.py", "--help", home=home, cwd=tmp_path)
    assert p.returncode == 0 and "--pack DIR" in p.stdout, p.stderr
    p = run(rec / "train_gpt.py", "--pack", str(tmp_path / "again"), home=home, cwd=tmp_path)
    assert p.returncode == 2 and "packed train_gpt.py" in p.stderr and not (tmp_path / "again").exists()
    with open(src / "rans_codec.py", "a") as f:
        f.write("# edited after packing\n")
    p = run(rec / "train_gpt.py", "--help", home=home, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == "", p.stderr
    assert p.stderr.startswith(f"error: stale pack: {src / 'rans_codec.py'} changed since packing"), p.stderr


# ---------------------------------------------------------------------------------------------------
# the packed smoke run == the source's, bit for bit
# ---------------------------------------------------------------------------------------------------


def smoke_args(small_data, run_dir):
    return ["--preset", "smoke", "--data-path", str(small_data), "--tokenizer-path", str(TOKENIZER),
            "--run-dir", str(run_dir), "--iterations", "4", "--warmdown-iters", "2", "--log-every", "1",
            "--save-every", "0", "--slot", "causal", "--slot-steps", "2", "--ttt", "0"]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory, small_data):
    """The same smoke run from the sources and from a fresh pack of them (its own HOME: it unpacks first)."""
    tmp_path = tmp_path_factory.mktemp("smoke")
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "train_gpt.py").write_bytes(packing.pack_script(ROOT, tg.CODE_FILES))
    results = {"tmp": tmp_path, "script": rec / "train_gpt.py"}
    for name, script in (("source", ROOT / "train_gpt.py"), ("packed", rec / "train_gpt.py")):
        p = run(script, *smoke_args(small_data, tmp_path / name), home=tmp_path / f"home_{name}", cwd=tmp_path)
        assert p.returncode == 0, f"{name}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        log = (tmp_path / name / "train.log").read_text()
        size = next(line for line in log.splitlines() if line.startswith("size: "))
        results[name] = (json.loads((tmp_path / name / "submission.json").read_text()), size, parse_steps(log))
    return results


def scores(sub):
    return {m: (v["val_bpb"], v["val_loss"]) for m, v in sub["eval_modes"].items()}


def test_packed_smoke_run_matches_the_source_bit_for_bit(smoke_runs):
    tmp_path, script = smoke_runs["tmp"], smoke_runs["script"]
    (src, src_size, src_steps), (pk, pk_size, pk_steps) = smoke_runs["source"], smoke_runs["packed"]
    n = script.stat().st_size
    assert src_steps == pk_steps and sorted(src_steps) == [1, 2, 3, 4]
    assert scores(src) == scores(pk) and set(scores(src)) == {"roundtrip", "sliding", "slot_causal"}
    assert (src["val_bpb"], src["val_loss"], src["score_mode"]) == (pk["val_bpb"], pk["val_loss"], pk["score_mode"])
    assert (tmp_path / "source" / "model.hqa").read_bytes() == (tmp_path / "packed" / "model.hqa").read_bytes()
    # both count the packed script: the same bytes, the size of the file that ran
    assert src["bytes_code"] == pk["bytes_code"] == n and src["code_sha256"] == pk["code_sha256"]
    assert src["bytes_code_source"] == pk["bytes_code_source"] == sum((ROOT / f).stat().st_size for f in tg.CODE_FILES)
    assert src["bytes_total"] == src["bytes_model"] + n and pk["bytes_total"] == pk["bytes_model"] + n
    assert src_size.startswith(f"size: code:packed:{n} source:{src['bytes_code_source']} + model:")
    assert src_size == pk_size
    assert pk["command"].split()[0] == str(script)


def test_packed_script_under_torchrun(smoke_runs, small_data, monkeypatch):
    """Two ranks unpack at once (fresh HOME) and run the pipeline: the single process's numbers."""
    from test_train import TORCHRUN, _run
    tmp_path, script = smoke_runs["tmp"], smoke_runs["script"]
    two = tmp_path / "packed_two"
    home = tmp_path / "home_two"
    monkeypatch.setenv("HOME", str(home))  # _run passes the environment on
    log = _run([*TORCHRUN, str(script), *smoke_args(small_data, two)], two / "train.log",
               "saved:" + str(two / "submission.json"))
    assert "world_size:2" in log and len(list((home / ".cache" / "hqgpt").iterdir())) == 1
    one, two_sub = smoke_runs["packed"][0], json.loads((two / "submission.json").read_text())
    assert two_sub["bytes_code"] == script.stat().st_size
    for m, (bpb, loss) in scores(one).items():
        assert abs(scores(two_sub)[m][0] - bpb) < 1e-4 and abs(scores(two_sub)[m][1] - loss) < 1e-4, m
