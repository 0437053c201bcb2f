"""A run's identity and the bounded inputs around it: the metadata reader, checkpoint pointers that cannot be
edited unseen, the run's claim in the store, the mirror's dangling pointer, per-rank CPU devices, and settings
checked before anything is written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from kd import claims, faults, mirror
from kd.checkpoint import Checkpoints
from kd.errors import KDError
from kd.io import load_tensors, save_tensors, write_json
from kd.metadata import MAX_BYTES, MAX_DEPTH, MAX_INT_DIGITS, OBJECT, SHARD_INDEX, Shape, read_json


# ------------------------------------------------------------------------------------------- the metadata reader
@pytest.mark.parametrize("raw,needle", [
    (b'{"a": ' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH}"),
    (b'{"a": 1' + b"0" * MAX_INT_DIGITS + b"}", f"at most {MAX_INT_DIGITS}"),
    (b'{"a": 1e400}', "beyond a float's range"),
    (b'\xff\xfe{}', "not JSON text"),
    (b'[1, 2]', "not a JSON object"),
])
def test_the_metadata_reader_refuses_what_no_metadata_file_holds(tmp_path, raw, needle):
    path = tmp_path / "meta.json"
    path.write_bytes(raw)
    with pytest.raises(KDError, match="meta.json") as e:
        read_json(path, OBJECT)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_metadata_reader_never_reads_past_its_cap_nor_a_device(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b'{"a": "' + b"x" * MAX_BYTES + b'"}')
    with pytest.raises(KDError, match="larger than the 4 MiB"):
        read_json(big, OBJECT)
    with pytest.raises(KDError, match="not a regular file"):
        read_json("/dev/zero", OBJECT)
    with pytest.raises(KDError, match="is a folder"):
        read_json(tmp_path, OBJECT)


def test_a_shard_index_is_checked_member_by_member(tmp_path):
    path = tmp_path / "index.json"
    write_json(path, {"identity": {}, "shards": {"0": {"count": 10, "sha256": "ab"}, "1": {"count": -1,
                                                                                           "sha256": "cd"}}})
    with pytest.raises(KDError, match=r"'shards' \['1'\] 'count' is -1"):
        read_json(path, SHARD_INDEX)
    write_json(path, {"identity": {}, "shards": {"0": {"count": 10, "sha256": "ab"}}})
    assert read_json(path, SHARD_INDEX)["shards"]["0"]["count"] == 10


def test_a_pointer_whose_epoch_was_edited_is_refused(tmp_path):
    ckpts = Checkpoints(tmp_path, required=("file", "sha256", "epoch", "step"))
    ckpts.save({"w": torch.zeros(3)}, {"epoch": 1, "step": 7, "history": [{"loss": 1.0}], "run_id": "abc"})
    assert Checkpoints(tmp_path, required=("file", "sha256", "epoch", "step")).load("fix")["epoch"] == 1
    info = json.loads(ckpts.pointer.read_text())
    write_json(ckpts.pointer, {**info, "epoch": 2})  # the tensors' sha256 in the pointer still matches
    with pytest.raises(KDError, match="changed after its tensors were saved"):
        Checkpoints(tmp_path, required=("file", "sha256", "epoch", "step")).load("restore it")
    write_json(ckpts.pointer, {**info, "epoch": 10**9})
    with pytest.raises(KDError, match="'epoch' is 1000000000"):
        Checkpoints(tmp_path, required=("file", "sha256", "epoch", "step")).load("restore it")


# ------------------------------------------------------------------------------------- several CPU processes
def test_a_per_rank_cpu_device_loads_a_checkpoint(tmp_path):
    """Accelerate gives each process of a CPU run a device such as ``cpu:0`` / ``cpu:1``: each loads the
    checkpoint (safetensors itself takes only ``cpu``)."""
    path = tmp_path / "t.safetensors"
    digest = save_tensors(path, {"w": torch.arange(4.0)})
    for device in ("cpu:0", "cpu:1", torch.device("cpu", 1), torch.device("cpu")):
        assert torch.equal(load_tensors(path, digest, device=device)["w"], torch.arange(4.0))


# ------------------------------------------------------------------------------------------- the run's claim
def _claim(tmp_path, name="run-abc"):
    return claims.RunClaim(tmp_path / "runs" / name, store=tmp_path / "store")


def _record(claim, **changes) -> None:
    claim.folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    write_json(claim.path, {"state": "held", "host": socket.gethostname(), "pid": os.getpid(), "pid_start": None,
                            "started": now, "heartbeat": now, "run_folder": "elsewhere", "slurm": None,
                            "token": "theirs", **changes})


def test_one_claim_per_run_released_or_kept_as_finished(tmp_path):
    a = _claim(tmp_path)
    assert a.acquire(wait=False) and a.read()["token"] == a.token
    a.release()
    assert a.read() is None and not a.folder.exists()  # nothing mirrored: no folder left
    assert a.acquire(wait=False)
    a.release(finished=True)
    assert a.read()["state"] == "finished"


def test_a_live_holder_keeps_the_claim_a_gone_one_loses_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        b = _claim(tmp_path)
        _record(b, pid=holder.pid, pid_start=claims._pid_start(holder.pid))
        assert not b.acquire(wait=False)  # a live process of this host: never taken
        assert b.read()["token"] == "theirs"
    finally:
        holder.kill()
        holder.wait()
    assert b.acquire(wait=False) and b.replaced["token"] == "theirs"  # its pid is gone: stale
    b.release()


def test_a_claim_of_another_host_is_stale_only_after_its_heartbeat_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_CLAIM_STALE_S", "60")
    c = _claim(tmp_path)
    _record(c, host="elsewhere.example", heartbeat=time.time() - 30)
    assert not c.acquire(wait=False)
    _record(c, host="elsewhere.example", heartbeat=time.time() - 61)
    assert c.acquire(wait=False)
    _record(c, host="elsewhere.example", token="newer")  # taken over while this process was frozen
    with pytest.raises(KDError, match="taken over by pid .* on elsewhere.example"):
        c.refresh()
    assert c.read()["token"] == "newer"  # the new holder's claim stays


@pytest.mark.parametrize("value", ["abc", "5", "1e9"])
def test_a_stale_limit_out_of_range_is_refused(monkeypatch, value):
    monkeypatch.setenv("KD_CLAIM_STALE_S", value)
    with pytest.raises(KDError, match="KD_CLAIM_STALE_S"):
        claims.stale_after()


# ------------------------------------------------------------------------------------------------ the mirror
def test_a_mirror_pointer_naming_a_deleted_version_is_no_mirror(tmp_path, capsys):
    """The documented fix for a mirrored checkpoint that does not verify is to delete its version folder: the
    ``latest.json`` left naming it then means no mirror (one note), not an error."""
    run_dir = tmp_path / "runs" / "run-abc"
    folder = tmp_path / "store" / mirror.artifact_name(run_dir)
    folder.mkdir(parents=True)
    write_json(folder / "latest.json", {"version": "v3"})
    pointer = run_dir / "checkpoint.json"
    assert mirror.fetch(run_dir, pointer, "offline", "p", store=tmp_path / "store") is None
    assert "not in the store (deleted)" in capsys.readouterr().err and not pointer.exists()
    (folder / "v3").mkdir()
    (folder / "v3" / "manifest.json").write_text("{")
    with pytest.raises(KDError, match=f"delete {folder / 'v3'}"):
        mirror.fetch(run_dir, pointer, "offline", "p", store=tmp_path / "store")


# ------------------------------------------------------------------------------------ settings checked first
@pytest.mark.parametrize("spec", ["train-stepp@3", "train-step@0", "train-step@x", "train-step@3:HUP",
                                  "train-step"])
def test_a_malformed_fault_spec_is_refused(spec):
    with pytest.raises(KDError, match="KD_FAULT"):
        faults._parse(spec)


def test_a_fault_spec_of_known_points_parses():
    got = faults._parse("train-step@37:KILL, mirror-publish@1:ENOSPC")
    assert got["train-step"][0] == 37 and got["mirror-publish"] == (1, "ENOSPC")


@pytest.mark.parametrize("value", ["a/b", "../x", "a b", "x" * 129, "a:b"])
def test_an_exported_run_id_that_is_no_wandb_id_is_refused(monkeypatch, value):
    from kd.wandb_runs import exported_run_id

    monkeypatch.setenv("WANDB_RUN_ID", value)
    with pytest.raises(KDError, match="WANDB_RUN_ID"):
        exported_run_id()
    monkeypatch.setenv("WANDB_RUN_ID", "abc-12_x")
    assert exported_run_id() == "abc-12_x"


def test_shape_bounds_come_from_the_shape(tmp_path):
    path = tmp_path / "small.json"
    path.write_bytes(b'{"a": "' + b"x" * 200 + b'"}')
    with pytest.raises(KDError, match="larger than"):
        read_json(path, Shape("a small file", max_bytes=100))


def test_a_lock_that_is_a_folder_is_refused(tmp_path):
    from kd.run_folder import LOCK_FILE, RunFolder

    (tmp_path / "run" / LOCK_FILE).mkdir(parents=True)
    with pytest.raises(KDError, match="is not a file"):
        RunFolder(tmp_path / "run", {"a": 1}).open()


def test_a_flag_value_that_is_not_utf8_is_refused():
    from kd.config import DistillConfig
    from kd.flags import parse_flags

    raw = os.fsdecode(b"runs-\xff")  # as sys.argv holds a path of other bytes
    with pytest.raises(KDError, match="not UTF-8"):
        parse_flags(DistillConfig, [f"--out_dir={raw}"])


class _GoneService:
    """A W&B run whose service process already exited (as after a stop that signals every process)."""

    def mark_preempting(self):
        raise ConnectionResetError("connection reset by peer")

    def finish(self, exit_code=None):
        raise BrokenPipeError("broken pipe")


def test_a_stop_is_a_preemption_when_the_wandb_service_is_gone(capsys, monkeypatch):
    import wandb

    from kd.tracker import Tracker

    monkeypatch.setattr(wandb, "teardown", lambda *a, **k: None)
    stopped = Tracker(mode="offline")
    stopped.run, stopped.run_id = _GoneService(), "abc"
    stopped.end(143)  # one warning, the exit code stays
    assert "could not be marked preempting" in capsys.readouterr().err
    finished = Tracker(mode="offline")
    finished.run, finished.run_id = _GoneService(), "abc"
    with pytest.raises(KDError, match="run the same command again"):
        finished.end(0)  # a normal end W&B does not take: not marked done
