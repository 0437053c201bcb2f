"""Trust no file blindly: no pickle, every checkpoint / teacher / cache / pool verified by hash before use
(truncated and bit-flipped files are refused with one line and exit code 2), names cannot leave the store, and
no API key reaches a file.

Per case, what a damaged file does:
* teacher artifact (any file of a store version): refused, "delete the version folder and publish it again";
* checkpoint (tensors or pointer): refused before W&B or anything else starts; never a silent restart from
  scratch: the user restores the file or passes --resume=False (which then trains from scratch);
* teacher cache: refused ("delete it to rebuild it, or --teacher_cache=False"); a *missing* cache is rebuilt;
* synthetic pool: refused ("generate it again"); a damaged shard of an unfinished generation is made again.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch

from kd.artifacts import publish, resolve
from kd.errors import KDError
from kd.io import save_tensors, save_weights, write_json
from kd.models import build_model
from tests.conftest import ROOT, TINY, run_script

sys.path.insert(0, str(ROOT))
import distill  # noqa: E402
import train  # noqa: E402

TEACHERS = ("teacher-digits-preresnet8-s0", "teacher-digits-preresnet8-s1")


pytestmark = pytest.mark.usefixtures("one_thread")


def damage(path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    else:  # one flipped bit in the middle (inside the tensor data for a weights file)
        raw[len(raw) // 2] ^= 0x10
        path.write_bytes(bytes(raw))


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def refused(capsys, folder, entry, argv, *needles, unchanged: bool = True) -> str:
    capsys.readouterr()
    before = snapshot(folder)
    with pytest.raises(SystemExit) as e:
        entry(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1, lines
    for needle in needles:
        assert re.search(needle, lines[0]), (needle, lines[0])
    if unchanged:
        assert snapshot(folder) == before, set(snapshot(folder)) ^ set(before)
    return lines[0]


@pytest.fixture
def store(workdir):
    root = workdir / "artifacts"
    for name in TEACHERS:
        folder = workdir / "made" / name
        meta = save_weights(folder, build_model("preresnet8", 10).state_dict(),
                            {"arch": "preresnet8", "dataset": "digits", "num_classes": 10, "seed": 0})
        publish(name, "model", [folder / "model.safetensors", folder / "meta.json"], meta, store=root)
    return root


# ------------------------------------------------------------------------------------------------ no pickle
def test_weights_are_never_unpickled():
    """Weights only through safetensors (or torch.load(weights_only=True)); no pickle in the product code."""
    sources = [*sorted((ROOT / "kd").glob("*.py")), ROOT / "train.py", ROOT / "distill.py"]
    for src in sources:
        text = src.read_text()
        assert not re.search(r"^\s*(import|from) (pickle|dill|joblib)\b", text, re.M), src
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (src, call)
        assert "load_state(" not in text, src  # accelerate's load_state unpickles (weights_only=False)


# ------------------------------------------------------------------------------------------------ teacher artifact
@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
@pytest.mark.parametrize("file", ["model.safetensors", "meta.json"])
def test_damaged_teacher_artifact_is_refused(file, how, store, workdir, capsys):
    damage(store / TEACHERS[1] / "v0" / file, how)
    refused(capsys, workdir, distill.main, [*TINY, "--ensemble_size=2"],
            rf"artifact file .*{TEACHERS[1]}/v0/{re.escape(file)} is corrupt \(sha256 mismatch\): delete .* and "
            "publish it again")


def test_damaged_store_pointers_are_refused(store, workdir, capsys):
    (store / TEACHERS[0] / "latest.json").write_text('{"version": "v')  # cut off
    refused(capsys, workdir, distill.main, [*TINY], r"corrupt JSON in .*latest\.json")
    (store / TEACHERS[0] / "latest.json").write_text('{"version": "v7"}')  # names no version that exists
    refused(capsys, workdir, distill.main, [*TINY], r"missing file .*v7/manifest\.json")


# ------------------------------------------------------------------------------------------------ checkpoint
RUN = [*TINY, "--epochs=1", "--seed=9"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    run_script("train.py", *RUN, cwd=folder, env={"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    return folder / "runs"


@pytest.fixture
def unfinished_run(finished_run, workdir, monkeypatch):
    """A copy of a 1-epoch teacher run without its done.json: its last checkpoint is what a rerun resumes."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    shutil.copytree(finished_run, workdir / "runs")
    (run_dir,) = (workdir / "runs").iterdir()
    (run_dir / "done.json").unlink()
    return RUN, run_dir


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_damaged_checkpoint_is_refused_not_restarted(how, unfinished_run, workdir, capsys):
    argv, run_dir = unfinished_run
    ckpt = run_dir / json.loads((run_dir / "checkpoint.json").read_text())["file"]
    damage(ckpt, how)
    damaged = ckpt.read_bytes()
    refused(capsys, workdir, train.main, argv, rf"the checkpoint .*{ckpt.name} is corrupt",
            "pass --resume=False to train this run from scratch")
    assert ckpt.read_bytes() == damaged  # left as it was, for the user to look at
    if how == "truncated":
        train.main([*argv, "--resume=False"])  # the explicit way out
        assert (run_dir / "done.json").exists()


def test_run_id_survives_a_kill_before_the_first_checkpoint(workdir, monkeypatch):
    """run.json keeps the W&B run id from the start, so a rerun continues the same W&B run (bug: a new id)."""
    from kd.config import TrainConfig
    from kd.flags import parse_flags
    from kd.session import Session

    monkeypatch.setenv("WANDB_MODE", "disabled")
    first = Session(parse_flags(TrainConfig, RUN), job="teacher")
    first.start_tracking()
    again = Session(parse_flags(TrainConfig, RUN), job="teacher")  # no checkpoint yet
    again.start_tracking()
    assert again.tracker.run_id == first.tracker.run_id and not again.ckpt
    over = Session(parse_flags(TrainConfig, [*RUN, "--resume=False"]), job="teacher")
    over.start_tracking()
    assert over.tracker.run_id != first.tracker.run_id  # starting over is a new W&B run


def test_damaged_checkpoint_pointer_is_refused(unfinished_run, workdir, capsys):
    argv, run_dir = unfinished_run
    pointer = run_dir / "checkpoint.json"
    text = pointer.read_text()
    pointer.write_text(text[: len(text) // 2])
    refused(capsys, workdir, train.main, argv, "the checkpoint pointer .* is corrupt", "--resume=False")
    pointer.write_text(json.dumps({"file": "ckpt-1.safetensors"}))
    refused(capsys, workdir, train.main, argv, "is incomplete", "--resume=False")
    pointer.write_text(text.replace('"ckpt-1.safetensors"', '"../../escape.safetensors"'))
    refused(capsys, workdir, train.main, argv, "is missing", "--resume=False")


# ------------------------------------------------------------------------------------------------ teacher cache
@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_damaged_teacher_cache_is_refused(how, store, workdir, monkeypatch, capsys):
    """The cache distill.py would use (made here with stand-in values: only its file matters) is refused."""
    from kd.data import load_dataset
    from kd.teacher_cache import cache_key

    monkeypatch.setenv("WANDB_MODE", "disabled")
    data = load_dataset("digits")
    teacher_hash = json.loads((store / TEACHERS[0] / "v0" / "meta.json").read_text())["sha256"]
    cache = store / "_cache" / f"teacher-targets-{cache_key([teacher_hash], data)}-float32.safetensors"
    digest = save_tensors(cache, {"log_probs": torch.zeros(data.n_train, data.num_views, 10)})
    write_json(cache.with_suffix(".json"), {"sha256": digest, "dtype": "torch.float32"})
    damage(cache, how)
    damaged = cache.read_bytes()
    refused(capsys, workdir, distill.main, [*TINY], rf"{cache.name} is corrupt or was changed",
            "the teacher cache: delete", "--teacher_cache=False", unchanged=False)  # (its run folder is started)
    assert cache.read_bytes() == damaged  # refused, not rebuilt behind the user's back


# ------------------------------------------------------------------------------------------------ synthetic pool
@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_damaged_synthetic_pool_is_refused(how, store, workdir, capsys):
    images = torch.randint(0, 256, (800, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pool = workdir / "pool" / "pool.safetensors"
    digest = save_tensors(pool, {"images": images})
    write_json(pool.with_suffix(".json"), {"sha256": digest, "count": 800, "dataset": "digits", "model": "test"})
    damage(pool, how)
    refused(capsys, workdir, distill.main, [*TINY, "--synthetic_ratio=0.25", f"--synthetic_pool={pool}"],
            r"pool\.safetensors is corrupt or was changed: sha256 .* does not match")


# ------------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "/tmp/abs", "a/b", "..", ".hidden", "", "x" * 200,
                                  "teacher-digits\nx", "teacher..x"])
def test_names_cannot_leave_the_store(name, tmp_path):
    store = tmp_path / "store"
    (tmp_path / "f.txt").write_text("data")
    with pytest.raises(KDError, match="invalid artifact name"):
        publish(name, "model", [tmp_path / "f.txt"], {}, store=store)
    with pytest.raises(KDError, match="invalid artifact name"):
        resolve(name, store=store)
    assert not store.exists() or not any(store.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) in (["f.txt"], ["f.txt", "store"])


def test_a_symlink_out_of_the_store_is_refused(tmp_path):
    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    outside.mkdir()
    (store / "teacher-x").symlink_to(outside)
    (tmp_path / "f.txt").write_text("data")
    with pytest.raises(KDError, match="would leave the store"):
        publish("teacher-x", "model", [tmp_path / "f.txt"], {}, store=store)
    assert not any(outside.iterdir())


def test_publish_twice_the_same_files_is_one_version(tmp_path):
    """A publish cut off after its version folder (before latest.json) and run again adds no copy."""
    (tmp_path / "f.txt").write_text("data")
    store = tmp_path / "store"
    first = publish("pool-x", "dataset", [tmp_path / "f.txt"], {"n": 1}, store=store)
    (store / "pool-x" / "latest.json").unlink()  # as a kill between the two would leave it
    assert publish("pool-x", "dataset", [tmp_path / "f.txt"], {"n": 1}, store=store) == first
    assert json.loads((store / "pool-x" / "latest.json").read_text()) == {"version": "v0"}
    assert publish("pool-x", "dataset", [tmp_path / "f.txt"], {"n": 2}, store=store).name == "v1"  # new metadata
    damage(store / "pool-x" / "v1" / "f.txt", "bit-flipped")
    assert publish("pool-x", "dataset", [tmp_path / "f.txt"], {"n": 2}, store=store).name == "v2"  # never reused


def test_temps_of_killed_writers_are_removed_others_kept(tmp_path):
    import subprocess

    from kd.io import owner_tag, remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited (and was reaped)
    host, me = owner_tag().split("-")
    names = {f".ckpt-2.safetensors.{host}-{dead}.k2j_9x.tmp": False, f".incoming-{host}-{dead}-a1b2": False,
             f".ckpt-3.safetensors.{host}-{me}.abc.tmp": True,  # this (live) process is writing it
             f".pool.safetensors.0badc0de-{dead}.abc.tmp": True,  # another host's (a shared store)
             ".shard-00001.safetensors.abc.tmp": True, "ckpt-2.safetensors": True}
    for name in names:
        (tmp_path / name).mkdir() if name.startswith(".incoming") else (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, keep in names.items() if not keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, keep in names.items() if keep)


# ------------------------------------------------------------------------------------------------ secrets
def test_api_key_is_never_written(tmp_path):
    """An offline run with WANDB_API_KEY set: the key appears in no file of the run, the store or wandb/."""
    secret = "secret-kd-0123456789abcdef0123456789abcdef"
    run_script("train.py", *TINY, "--epochs=1", "--seed=4", cwd=tmp_path,
               env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "manifest.json" for p in files)
    leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaked, leaked
