"""Trust in a study's numbers: pinned teachers, resume that checks its inputs, signals, outputs checked first,
W&B's own keys on the command line, login detection as wandb does it. Each finding is reproduced first."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from kd.config import DistillConfig
from kd.errors import KDError
from kd.flags import parse_flags
from kd.wandb_runs import leet_records
from tests.conftest import ROOT, TINY, merged, offline_env, run_main, run_script, tiny

DEMO = [*TINY, "--epochs=2", "--study=demo"]


def teacher_sha(folder, name: str, alias: str = "latest") -> str:
    from kd.artifacts import local_versions

    version = local_versions(name, folder / "artifacts", alias)
    return json.loads((version / "meta.json").read_text())["sha256"]


@pytest.fixture(scope="module")
def demo_teachers(tmp_path_factory):
    """Two study-"demo" teachers, then the README's ad-hoc example, which republishes seed 0 (no study)."""
    folder = tmp_path_factory.mktemp("demo-teachers")
    for seed in (0, 1):
        assert run_main("train.py", *DEMO, f"--seed={seed}", cwd=folder, env={"WANDB_MODE": "disabled"}) == 0
    pinned = teacher_sha(folder, "teacher-digits-preresnet8-s0", "demo")
    assert run_main("train.py", *TINY, "--epochs=1", "--seed=0", cwd=folder, env={"WANDB_MODE": "disabled"}) == 0
    return folder, pinned


def student_config(folder) -> dict:
    (done,) = folder.glob("runs/student-*/done.json")
    return json.loads((done.parent / "config.json").read_text())


def test_an_ad_hoc_teacher_does_not_change_the_studys_students(demo_teachers, tmp_path):
    folder, pinned = demo_teachers
    latest = teacher_sha(folder, "teacher-digits-preresnet8-s0")
    assert latest != pinned  # the finding: `latest` moved to the ad-hoc 1-epoch teacher
    env = {"KD_STORE": str(folder / "artifacts"), "WANDB_MODE": "disabled"}
    assert run_main("distill.py", *merged(DEMO, ["--epochs=1", "--teacher_pool=2"]), cwd=tmp_path, env=env) == 0
    assert student_config(tmp_path)["teacher_hashes"] == [pinned]
    # a run outside any study still takes the newest version, as before
    other = tmp_path / "adhoc"
    other.mkdir()
    assert run_main("distill.py", *TINY, "--epochs=1", "--teachers=teacher-digits-preresnet8-s0", cwd=other,
                    env=env) == 0
    assert student_config(other)["teacher_hashes"] == [latest]


def test_a_declared_pool_refuses_a_missing_member(demo_teachers, tmp_path):
    folder, _ = demo_teachers
    env = {"KD_STORE": str(folder / "artifacts"), "WANDB_MODE": "disabled"}
    out = run_script("distill.py", *DEMO, "--teacher_pool=4", "--ensemble_size=2", "--trial=1", cwd=tmp_path,
                     env=env, check=False)  # block 2..3 of a pool of 4: seeds 2 and 3 were never trained
    assert out.returncode == 2, out.stderr
    assert "no teacher 'teacher-digits-preresnet8-s2' with alias 'demo'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.slow  # several seconds to half a minute: make chaos runs it
def test_resume_refuses_a_teacher_republished_between_stop_and_rerun(demo_teachers, tmp_path):
    folder, _ = demo_teachers
    store = tmp_path / "store"
    import shutil

    shutil.copytree(folder / "artifacts", store)
    env = {"KD_STORE": str(store), "WANDB_MODE": "disabled"}
    args = merged(DEMO, ["--epochs=3", "--teacher_pool=2", "--batch_size=64"])
    out = run_script("distill.py", *args, cwd=tmp_path, env={**env, "KD_FAULT": "train-step@30:TERM"}, check=False)
    assert out.returncode == 143, out.stderr[-2000:]
    # the study's teacher s0 is trained again (same study, other hyperparameters): the study alias moves
    (tmp_path / "retrain").mkdir()
    assert run_main("train.py", *DEMO, "--seed=0", "--lr=0.07", cwd=tmp_path / "retrain", env=env) == 0
    out = run_script("distill.py", *args, cwd=tmp_path, env=env, check=False)
    assert out.returncode == 2, out.stdout[-1000:] + out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "changed since its checkpoint (teacher_hashes" in lines[0], out.stderr
    assert "--resume=False" in lines[0]


@pytest.mark.slow  # several seconds to half a minute: make chaos runs it
def test_a_sigterm_during_set_up_is_a_preemption(demo_teachers, tmp_path):
    """Stopped while the teacher cache is built (before training): nothing to checkpoint, one line, exit 143, the
    W&B run marked preempting (so an agent reruns it); the same command then finishes."""
    folder, _ = demo_teachers
    env = {"KD_STORE": str(tmp_path / "store")}
    import shutil

    for teacher in (folder / "artifacts").glob("teacher-*"):  # the teachers only: no cache, no mirrored run
        shutil.copytree(teacher, tmp_path / "store" / teacher.name)
    args = merged(DEMO, ["--epochs=1", "--teacher_pool=2"])
    out = run_script("distill.py", *args, cwd=tmp_path, env={**env, "KD_FAULT": "cache-build@2:TERM"}, check=False)
    assert out.returncode == 143, out.stderr[-2000:]
    message = "interrupted by SIGTERM outside training (nothing to checkpoint); run the same command again"
    assert out.stderr.count(message) == 1 and "Traceback" not in out.stderr and "error" not in out.stderr.lower()
    records = leet_records(next((tmp_path / "wandb").glob("offline-run-*")))
    assert any(r.get("type") == "preempting" or "preempting" in r for r in records)
    assert not list(tmp_path.glob("runs/*/checkpoint.json"))
    again = run_script("distill.py", *args, cwd=tmp_path, env=env)
    assert "student artifact" in again.stdout


@pytest.mark.slow  # several seconds to half a minute: make chaos runs it
def test_sigint_checkpoints_one_line_exit_130_and_resumes(tmp_path):
    args = [*tiny(batch_size=64), "--epochs=2", "--seed=3"]
    out = run_script("train.py", *args, cwd=tmp_path, env={"KD_FAULT": "train-step@30:INT"}, check=False)
    assert out.returncode == 130, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "%|" not in ln]  # tqdm's bar is not a line
    assert len(lines) == 1 and lines[0].startswith("interrupted by SIGINT: checkpoint saved"), out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    ckpt = json.loads(next(tmp_path.glob("runs/*/checkpoint.json")).read_text())
    assert ckpt["epoch"] == 1 and ckpt["step"] == 7  # 23 steps an epoch: stopped at the next step, mid-epoch 2
    records = leet_records(next((tmp_path / "wandb").glob("offline-run-*")))
    # Ctrl-C (or a stop from the W&B UI, which the SDK delivers as SIGINT): stopped, not marked for a rerun
    assert not any(r.get("type") == "preempting" or "preempting" in r for r in records), [r.get("type")
                                                                                      for r in records]
    again = run_script("train.py", *args, cwd=tmp_path)
    assert "resuming" in again.stdout and "teacher artifact" in again.stdout


def entry(name: str):
    sys.path.insert(0, str(ROOT))
    import distill
    import train

    return {"train": train.main, "distill": distill.main}[name]


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def refused(capsys, folder, argv, needle, name="train"):
    capsys.readouterr()
    before = snapshot(folder)
    with pytest.raises(SystemExit) as e:
        entry(name)(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert snapshot(folder) == before


def test_unwritable_outputs_are_refused_before_any_work(workdir, capsys):
    (workdir / "afile").write_text("x")
    refused(capsys, workdir, [*TINY, "--out_dir=afile/runs"], "--out_dir")
    refused(capsys, workdir, [*TINY, "--store=afile"], "afile is a file")
    os.environ["WANDB_DIR"] = str(workdir / "afile")
    try:
        refused(capsys, workdir, TINY, "the W&B folder")
    finally:
        os.environ["WANDB_DIR"] = str(workdir)


def test_no_space_left_is_refused_before_any_work(workdir, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    refused(capsys, workdir, TINY, "MiB free but the run needs at least")


def test_the_free_space_check_counts_the_largest_moment(workdir, capsys, monkeypatch, demo_teachers):
    """Room for weights, momentum and final weights is not enough: two checkpoints coexist for a moment, one is
    mirrored in the store, the final weights go to the run folder and the store, and a student's teacher cache
    is written to the store too."""
    import shutil
    from collections import namedtuple

    from kd.models import build_model, count_params

    weights = 4 * count_params(build_model("preresnet8", 10))
    usage = namedtuple("usage", "total used free")
    free = {"bytes": 5 * weights}  # more than weights + momentum + final weights (3x), less than the 8x needed
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - free["bytes"], free["bytes"]))
    refused(capsys, workdir, TINY, "MiB free but the run needs at least")
    folder, _ = demo_teachers
    monkeypatch.setenv("KD_STORE", str(folder / "artifacts"))  # read only: the check comes first
    monkeypatch.setenv("WANDB_MODE", "disabled")
    free["bytes"] = 9 * weights  # room for the checkpoints and weights, not for the teacher cache (1437 x 9 x 10)
    refused(capsys, workdir, [*TINY, "--study=demo", "--teacher_pool=2"], "MiB free but the run needs at least",
            name="distill")


def test_unknown_wandb_mode_is_one_line(workdir, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    refused(capsys, workdir, TINY, "WANDB_MODE='sometimes' is not a W&B mode")


def test_files_keep_the_umask(workdir):
    old = os.umask(0o022)
    try:
        run_script("train.py", *TINY, "--epochs=1", cwd=workdir, env={"WANDB_MODE": "disabled"})
    finally:
        os.umask(old)
    version = workdir / "artifacts" / "teacher-digits-preresnet8-s0" / "v0"
    for path in (version, version / "model.safetensors", version / "meta.json", *workdir.glob("runs/*/done.json")):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_wandb_keys_passed_back_are_ignored_with_one_line_real_unknowns_refused(capsys):
    cfg = parse_flags(DistillConfig, ["--dataset=digits", "--arch=preresnet8", "--job=student",
                                      "--teacher_names=['a']", "--_wandb={}", "--n_params=5"])
    assert cfg.dataset == "digits"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "_wandb, job, n_params, teacher_names" in err
    with pytest.raises(KDError, match="unknown flag --jobs"):
        parse_flags(DistillConfig, ["--jobs=3"])


def wandb_mode_in(tmp_path, env: dict) -> str:
    """kd.wandb_runs.wandb_mode() in a fresh process (wandb caches its settings per process)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    full.update({"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "config"), **env})
    code = "from kd.wandb_runs import wandb_mode; print(wandb_mode())"
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_login_is_detected_as_wandb_does_host_port_and_saved_host(tmp_path):
    key = "a" * 40
    (tmp_path / ".netrc").write_text(f"machine selfhosted.example:8080\n  login user\n  password {key}\n")
    (tmp_path / ".netrc").chmod(0o600)
    netrc = {"NETRC": str(tmp_path / ".netrc")}
    assert wandb_mode_in(tmp_path, netrc) == "offline"  # the default host has no entry
    assert wandb_mode_in(tmp_path, {**netrc, "WANDB_BASE_URL": "http://selfhosted.example:8080"}) == "online"
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "settings").write_text("[default]\nbase_url = http://selfhosted.example:8080\n")
    assert wandb_mode_in(tmp_path, netrc) == "online"  # the host `wandb login --host` saved
    assert wandb_mode_in(tmp_path, {"WANDB_API_KEY": key}) == "online"


@pytest.mark.slow  # several seconds to half a minute: make chaos runs it
def test_a_finished_config_under_a_sweep_agent_still_reports(tmp_path):
    args = [*TINY, "--epochs=1", "--seed=4"]
    run_script("train.py", *args, cwd=tmp_path)
    env = {**offline_env(tmp_path), "WANDB_SWEEP_ID": "sweep123", "WANDB_RUN_ID": "dup0000run"}
    out = run_script("train.py", *args, cwd=tmp_path, env=env)
    assert "already finished" in out.stdout
    from kd.wandb_runs import inspect_summary

    (folder,) = (tmp_path / "wandb").glob("offline-run-*-dup0000run")
    summary = inspect_summary(folder)["summary"]
    (first,) = [f for f in (tmp_path / "wandb").glob("offline-run-*") if f != folder]
    assert summary["duplicate_of"] == first.name.rsplit("-", 1)[1] and summary["final"] is True
