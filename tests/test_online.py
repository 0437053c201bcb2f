"""The online path at the SDK boundary, where no W&B server exists here.

What is replaced, and only that: the W&B *run* handed to kd.artifacts / kd.teachers is a stand-in with the
attributes the code reads (entity, project, use_artifact), and ``wandb.Api`` is a stand-in whose
``artifact_collections`` answers as the public API's would (objects with ``.name``) or raises W&B's own
``wandb.errors.CommError``. Everything else is the repository's and wandb's real code.
"""

from __future__ import annotations

import types

import pytest
import wandb

from kd import artifacts, teachers, wandb_runs
from kd.errors import KDError
from kd.io import save_weights
from kd.models import build_model
from kd.tracker import unlocked


class FakeRun:
    def __init__(self, entity="team", project="sweep-project", error=None):
        self.entity, self.project, self.error, self.asked = entity, project, error, []

    def use_artifact(self, ref):
        self.asked.append(ref)
        raise self.error


def publish_teacher(store, name):
    folder = store.parent / "made" / name
    meta = save_weights(folder, build_model("preresnet8", 10).state_dict(),
                        {"arch": "preresnet8", "dataset": "digits", "num_classes": 10, "seed": 0})
    artifacts.publish(name, "model", [folder / "model.safetensors", folder / "meta.json"], meta, store=store,
                      aliases=["demo"])


@pytest.fixture
def online(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb_runs, "check_reachable", lambda *a, **k: None)  # the server is the stand-in's
    return tmp_path / "store"


def test_an_unreachable_server_is_one_line_at_once(monkeypatch):
    """Online with no network: one line naming the server and the offline fix, within the connect timeout (not
    after wandb.init's minutes of retries); a server that accepts connections passes."""
    import socket
    import time

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        monkeypatch.delenv("HTTPS_PROXY", raising=False)
        monkeypatch.delenv("https_proxy", raising=False)
        wandb_runs.check_reachable(timeout=5)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")  # closed now: refused
    wandb_runs._REACHED.clear()
    t0 = time.monotonic()
    with pytest.raises(KDError, match=f"W&B at http://127.0.0.1:{port} is not reachable .*WANDB_MODE=offline"):
        wandb_runs.check_reachable(timeout=5)
    assert time.monotonic() - t0 < 5


def test_a_teacher_only_in_the_local_store_says_to_sync_it(online):
    publish_teacher(online, "teacher-digits-preresnet8-s0")
    run = FakeRun(error=wandb.errors.CommError("artifact 'teacher-digits-preresnet8-s0:demo' not found"))
    with pytest.raises(KDError) as e:
        artifacts.resolve("teacher-digits-preresnet8-s0", run=run, store=online, kind="teacher", alias="demo")
    msg = str(e.value)
    assert run.asked == ["teacher-digits-preresnet8-s0:demo"]  # resolved through the run: lineage recorded
    assert "team/sweep-project" in msg and "wandb sync" in msg and "WANDB_MODE=offline" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("error", [wandb.errors.CommError("permission denied"), ValueError("bad project"),
                                   ConnectionError("network is unreachable")])
def test_every_wandb_failure_is_one_line_naming_the_fix(online, error):
    run = FakeRun(error=error)
    with pytest.raises(KDError, match="cannot fetch teacher teacher-x-s0:latest from the W&B project team/"):
        artifacts.resolve("teacher-x-s0", run=run, store=online, kind="teacher")


def test_teachers_are_listed_in_the_runs_own_entity_and_project(online, monkeypatch):
    asked = []

    class Api:
        def artifact_collections(self, where, type_name):
            asked.append((where, type_name))
            return [types.SimpleNamespace(name=n) for n in
                    ("teacher-digits-preresnet8-s1", "teacher-digits-preresnet8-s0", "teacher-cifar10-preresnet8-s0",
                     "student-digits-preresnet8-m1")]

    monkeypatch.setattr(wandb, "Api", Api)
    found = teachers.available_teachers("digits", "preresnet8", store=online, run=FakeRun(project="from-sweep"))
    assert asked == [("team/from-sweep", "model")]  # not --project: the run's own (a sweep's) project
    assert found == ["teacher-digits-preresnet8-s0", "teacher-digits-preresnet8-s1"]

    class Down:
        def artifact_collections(self, where, type_name):
            raise wandb.errors.CommError("could not resolve host")

    monkeypatch.setattr(wandb, "Api", Down)
    with pytest.raises(KDError, match="cannot list the teachers of the W&B project team/from-sweep"):
        teachers.available_teachers("digits", "preresnet8", store=online, run=FakeRun(project="from-sweep"))


def test_sweep_locked_keys_are_not_passed_to_wandb_init(tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text("lr:\n  value: 0.05\nseed:\n  value: 3\n")  # what the agent writes
    config = {"lr": 0.05, "seed": 3, "epochs": 300, "job": "student"}
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.delenv("WANDB_SWEEP_PARAM_PATH", raising=False)
    assert unlocked(config) == config
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))  # the offline runner: a parameter file, no sweep id
    assert unlocked(config) == {"epochs": 300, "job": "student"}  # wandb.init locks the file's keys all the same
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")  # W&B's agent
    assert unlocked(config) == {"epochs": 300, "job": "student"}


def test_a_teacher_missing_from_the_declared_pool_is_refused_before_anything_is_written(online, monkeypatch,
                                                                                        tmp_path, capsys):
    """Online, the named teachers are looked up before the student's W&B run starts: a missing one is one line,
    exit 2, and neither a run folder nor a W&B run is made. Replaced: the public API's answers."""
    import sys

    from tests.conftest import ROOT, TINY

    asked = []

    class Api:
        default_entity = "team"

        def artifact_exists(self, name, type=None):
            asked.append((name, type))
            return not name.startswith("team/kd-fidelity/teacher-digits-preresnet8-s1:")

        def artifact(self, name, type=None):  # the mirrored checkpoint of a fresh run: none
            raise wandb.errors.CommError(f"artifact {name} not found")

    monkeypatch.setattr(wandb, "Api", Api)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("KD_STORE", str(online))
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(ROOT))
    import distill

    with pytest.raises(SystemExit) as e:
        distill.main([*TINY, "--study=demo", "--teacher_pool=2", "--ensemble_size=2"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1
    assert "no teacher 'teacher-digits-preresnet8-s1' with alias 'demo' in the W&B project team/kd-fidelity" in err[0]
    assert ("team/kd-fidelity/teacher-digits-preresnet8-s0:demo", "model") in asked
    assert not (tmp_path / "runs").exists() and not (tmp_path / "wandb").exists()
