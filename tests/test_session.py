"""kd.session: the one run lifecycle of every trainer: the outputs checked before anything is written, the rerun
answer "already finished", the room a run needs, the W&B run ended with the process's fate."""

from __future__ import annotations

import shutil

import pytest

from kd.config import TrainConfig
from kd.errors import Interrupted, KDError
from kd.flags import parse_flags
from kd.session import Session, room_needed
from kd.wandb_runs import inspect_summary, leet_records, offline_folders
from tests.conftest import TINY, run_main


def test_a_finished_run_says_so_and_writes_nothing(workdir, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert run_main("train.py", *TINY, "--epochs=1", cwd=workdir, env={"WANDB_MODE": "disabled"}) == 0
    before = sorted(str(p) for p in workdir.rglob("*"))
    session = Session(parse_flags(TrainConfig, [*TINY, "--epochs=1"]), job="teacher")
    capsys.readouterr()
    assert session.already_finished()
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("already finished: runs/teacher-digits-preresnet8-s0-") and "--resume=False" in line
    assert sorted(str(p) for p in workdir.rglob("*")) == before


def test_the_room_a_run_needs_is_checked_before_any_work(workdir, monkeypatch):
    assert room_needed(1000) == 8 * 4 * 1000 and room_needed(1000, cache_bytes=5) == 8 * 4 * 1000 + 5
    session = Session(parse_flags(TrainConfig, TINY), job="teacher")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(KDError, match=r"has 1 MiB free but the run needs at least 3 MiB there"):
        session.check_outputs(3 * 2**20)


def test_a_stop_ends_the_wandb_run_as_preempted(workdir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    session = Session(parse_flags(TrainConfig, TINY), job="teacher")
    with pytest.raises(Interrupted), session.tracked():
        session.start_tracking()
        raise Interrupted(15)
    (folder,) = offline_folders(workdir)
    assert inspect_summary(folder)["run_id"] == session.tracker.run_id
    assert any(r.get("type") == "preempting" or "preempting" in r for r in leet_records(folder))
    assert not session.folder.finished  # a stopped run is not finished: its rerun resumes it


def test_a_finished_runs_older_checkpoint_versions_are_deleted_from_wandb(monkeypatch, tmp_path, capsys):
    """kd.mirror.prune_online: of the run's checkpoint versions in W&B, all but ``latest`` are deleted with their
    aliases (wandb's Api with its credentials check answered and its version listing replaced); a W&B failure is
    a warning, not an error."""
    import wandb
    from wandb.apis.public import Api
    from wandb.apis.public.service_api import ServiceApi
    from wandb.proto import wandb_api_pb2 as apb

    from kd import mirror

    class Version:
        def __init__(self, version, aliases):
            self.version, self.aliases, self.deleted = version, aliases, None

        def delete(self, delete_aliases=False):
            self.deleted = delete_aliases

    versions = [Version("v0", []), Version("v1", ["run-abc"]), Version("v2", ["latest"])]
    listed = []

    def artifacts(self, type_name, name, **kw):
        listed.append((type_name, name))
        return iter(versions)

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_ENTITY", "me")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setattr(ServiceApi, "send_api_request", lambda *a, **k: apb.ApiResponse())
    monkeypatch.setattr(Api, "artifacts", artifacts)
    assert mirror.prune_online(tmp_path / "student-x-abc123", "kd-fidelity") == 2
    assert listed == [("checkpoint", "me/kd-fidelity/checkpoint-student-x-abc123")]
    assert [v.deleted for v in versions] == [True, True, None]  # the newest stays

    def broken(self, type_name, name, **kw):
        raise wandb.errors.CommError("connection refused")

    monkeypatch.setattr(Api, "artifacts", broken)
    assert mirror.prune_online(tmp_path / "student-x-abc123", "kd-fidelity") == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: the older versions of the checkpoint artifact checkpoint-student-x-abc123")
