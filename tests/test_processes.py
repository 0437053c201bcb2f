"""Runs of several processes, on the CPU: the process layout of ``accelerate launch`` on several GPUs.

torch's elastic launcher (``torchrun --nproc_per_node 2``; on a machine without GPUs the processes join over
gloo) starts a teacher and a student: each finishes with exit code 0, publishes one artifact version and writes
one W&B run. ``python -m kd.sweep.launch`` with ``KD_NUM_PROCESSES=2`` starts two workers the same way; a
SIGTERM to it checkpoints and exits 143, and after a SIGKILL of it its watcher stops the run: the workers
checkpoint, and no process of the run is left. Every program accepts its
own stored W&B config back as flags, as ``wandb agent`` passes it when it resumes a run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd.config import DistillConfig, TrainConfig
from kd.flags import parse_flags
from kd.wandb_runs import inspect_summary, offline_folders
from tests.conftest import ROOT, TINY, offline_env, tiny
from tests.fake_wandb_server import tagged

pytestmark = pytest.mark.slow  # several processes each: minutes on two cores (make chaos runs them)

ELASTIC = [sys.executable, "-m", "kd.sweep.elastic", "--standalone", "--nproc_per_node", "2"]


def env_for(folder: Path, **extra: str) -> dict:
    env = {**os.environ, **offline_env(folder)}
    for key in ("WANDB_RUN_ID", "WANDB_SERVICE", "KD_NUM_PROCESSES"):
        env.pop(key, None)
    return {**env, **extra}


def run(cmd: list[str], folder: Path, **extra: str) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=folder, env=env_for(folder, **extra), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def stored_flags(folder: Path) -> list[str]:
    """The run's config as W&B stores it, as the flags ``wandb agent`` builds from it on resume."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    config = inspect_summary(folder)["config"]
    return create_sweep_command_args({"args": {k: {"value": v} for k, v in config.items()}})["args"]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two-processes")
    teacher = run([*ELASTIC, str(ROOT / "train.py"), *TINY, "--epochs=1"], folder)
    student = run([*ELASTIC, str(ROOT / "distill.py"), *TINY, "--epochs=1",
                   "--teachers=teacher-digits-preresnet8-s0"], folder)
    return folder, teacher, student


def test_two_process_teacher_and_student_finish_publish_once_and_log_once(two_process_runs):
    folder, teacher, student = two_process_runs
    for out, name in ((teacher, "teacher-digits-preresnet8-s0"), (student, "student-digits-preresnet8-n1-t0-r0-T1")):
        assert sorted(p.name for p in (folder / "artifacts" / name).glob("v*")) == ["v0"], out.stdout[-1000:]
        assert out.stdout.count("W&B: offline") == 1  # only the main process speaks to W&B
    assert "teacher cache (built" in student.stdout  # built once, by the main process
    runs = offline_folders(folder)
    assert len(runs) == 2, [p.name for p in runs]  # one W&B run each, not one per process
    jobs = sorted(inspect_summary(f)["config"]["job"] for f in runs)
    assert jobs == ["student", "teacher"]
    for done in folder.glob("runs/*/done.json"):
        assert json.loads(done.read_text())["run_id"] in {f.name.rsplit("-", 1)[1] for f in runs}


def test_two_processes_resume_a_checkpoint_like_one(tmp_path):
    """Stopped by SIGTERM mid-epoch (every process, as a scheduler signals them), the same two-process command
    resumes the checkpoint on both ranks (each a CPU device of its own: cpu:0, cpu:1) and finishes the run."""
    args = [*ELASTIC, str(ROOT / "train.py"), *tiny(batch_size=64), "--epochs=2", "--seed=4"]
    out = subprocess.run(args, cwd=tmp_path, env=env_for(tmp_path, KD_FAULT="train-step@5:TERM"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and list(tmp_path.glob("runs/*/checkpoint.json")), out.stderr[-3000:]
    assert not list(tmp_path.glob("runs/*/done.json"))
    run_id = json.loads(next(tmp_path.glob("runs/*/run.json")).read_text())["run_id"]
    again = run(args, tmp_path)
    assert "resuming" in again.stdout and "at epoch 0 step 0" not in again.stdout, again.stdout[-2000:]
    assert json.loads(next(tmp_path.glob("runs/*/done.json")).read_text())["run_id"] == run_id


def test_stored_config_round_trips_as_flags(two_process_runs):
    folder, _, _ = two_process_runs
    for f in offline_folders(folder):
        config = inspect_summary(f)["config"]
        cls = {"teacher": TrainConfig, "student": DistillConfig}[config["job"]]
        parsed = parse_flags(cls, stored_flags(f))
        assert parsed.run_name() == config["run_name"]
        assert (folder / "runs" / f"{parsed.run_name()}-{parsed.fingerprint()}" / "done.json").exists()  # the same run


def test_an_error_on_the_main_process_during_set_up_reaches_every_process(two_process_runs):
    """The teachers are resolved on the main process; a missing one is the same one-line error on both, no hang."""
    folder, _, _ = two_process_runs
    cmd = [*ELASTIC, str(ROOT / "distill.py"), *TINY, "--epochs=1", "--teachers=teacher-digits-preresnet8-s9"]
    out = subprocess.run(cmd, cwd=folder, env=env_for(folder), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 2 and len(set(errors)) == 1 and "no teacher 'teacher-digits-preresnet8-s9'" in errors[0]


def workers_of(folder: Path) -> list[int]:
    """Live processes that run train.py itself (``python train.py ...``, not a launcher of it) into ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            program = [a for a in argv[1:3] if not a.startswith("-")]  # `python [-u] train.py`, not `python -m ...`
            if program == [str(ROOT / "train.py")] and f"--out_dir={folder}" in argv:
                pids.append(int(proc.name))
    return pids


def start_launcher(folder: Path) -> subprocess.Popen:
    args = [str(ROOT / "train.py"), *tiny(batch_size=16), "--epochs=50", f"--out_dir={folder / 'runs'}"]
    return subprocess.Popen([sys.executable, "-m", "kd.sweep.launch", *args], cwd=folder,
                            env=env_for(folder, KD_NUM_PROCESSES="2", OMP_NUM_THREADS="1", KD_TEST_TAG=folder.name),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(folder: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not list(folder.glob("runs/*/checkpoint.json")):
        assert proc.poll() is None and time.monotonic() < end, "the run stopped, or made no checkpoint in time"
        time.sleep(0.5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
@pytest.mark.parametrize("how", ["TERM", "KILL"])
def test_the_launcher_runs_two_workers_and_a_stop_leaves_none(tmp_path, how):
    proc = start_launcher(tmp_path)
    wait_for_checkpoint(tmp_path, proc)
    assert len(workers_of(tmp_path / "runs")) == 2  # the two workers of torch's elastic launcher
    proc.send_signal(getattr(signal, f"SIG{how}"))
    out, err = proc.communicate(timeout=120)
    if how == "TERM":  # passed on: every worker checkpoints, the run exits 143
        assert proc.returncode == 143, err[-3000:]
        ckpt = json.loads(next(tmp_path.glob("runs/*/checkpoint.json")).read_text())
        assert ckpt["step"] > 0 or ckpt["epoch"] > 0
    else:
        assert proc.returncode == -signal.SIGKILL
        assert "the launcher was killed: SIGTERM to the run's process group" in err  # its watcher stops the run
    assert "interrupted by SIGTERM: checkpoint saved" in err, err[-3000:]  # the workers checkpointed, killed or not
    end = time.monotonic() + 90
    while tagged(tmp_path.name) and time.monotonic() < end:
        time.sleep(0.5)
    assert tagged(tmp_path.name) == [], "a process of the run outlived the launcher"


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in environ if e.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the workers' environments in /proc")
@pytest.mark.parametrize("sig,rank", [("TERM", 1), ("INT", 0)])  # a scheduler's stop of one worker; W&B UI's: rank 0
def test_a_stop_on_one_rank_stops_both_at_the_same_step(tmp_path, sig, rank):
    """A signal to one worker only: both ranks leave the loop after the same step (each says where), the
    checkpoint is written, and the run exits as stopped by that signal (143 / 130), not through a failed
    collective."""
    proc = start_launcher(tmp_path)
    wait_for_checkpoint(tmp_path, proc)
    workers = {rank_of(pid): pid for pid in workers_of(tmp_path / "runs")}
    assert sorted(workers) == [0, 1]
    os.kill(workers[rank], getattr(signal, f"SIG{sig}"))
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + getattr(signal, f"SIG{sig}"), err[-3000:]
    import re

    # (a worker's line may follow the other's progress bar on the same terminal line)
    where = dict(re.findall(r"rank (\d): stopped by (SIG\w+ after epoch \d+ step \d+)", err))
    assert sorted(where) == ["0", "1"] and len(set(where.values())) == 1, err[-3000:]
    assert where["0"].startswith(f"SIG{sig} ")
    epoch, step = (int(w) for w in re.findall(r"\d+", where["0"]))
    ckpt = json.loads(next(tmp_path.glob("runs/*/checkpoint.json")).read_text())
    assert (ckpt["epoch"], ckpt["step"]) == (epoch - 1, step)  # saved where both stopped
    assert "Traceback" not in err and "ChildFailedError" not in err


SYNC_BN = r'''
import json, os, sys
import torch
import torch.distributed as dist
from kd.models import build_model
from kd.syncbn import synchronise

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = build_model("preresnet8", 10).double()
x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
w = torch.randn(16, 10, dtype=torch.float64)
part = slice(rank * 16 // world, (rank + 1) * 16 // world)
if world > 1 and not os.environ.get("NO_SYNC"):
    model = synchronise(model, torch.device("cpu"))
model.train()
loss = (model(x[part]) * w[part]).sum() / 16  # this rank's share of the global batch's mean loss
loss.backward()
grads = [p.grad.clone() for p in model.parameters()]
if world > 1:
    for g in grads:
        dist.all_reduce(g)
if rank == 0:
    state = {k: v.tolist() for k, v in model.state_dict().items() if "running" in k}
    state["grads"] = [g.flatten().tolist() for g in grads]
    with open(sys.argv[1], "w") as fh:
        json.dump(state, fh)
dist.destroy_process_group()
'''


def test_two_processes_compute_one_processs_batchnorm_statistics_and_gradients(tmp_path):
    """kd.syncbn on 2 processes (gloo): each takes half of a batch of 16; the running statistics after the step
    and the summed gradients equal one process's on the whole batch (float64: to rounding)."""
    (tmp_path / "syncbn.py").write_text(SYNC_BN)
    one = [sys.executable, "-m", "kd.sweep.elastic", "--standalone", "--nproc_per_node", "1"]
    run([*one, str(tmp_path / "syncbn.py"), str(tmp_path / "one.json")], tmp_path, PYTHONPATH=str(ROOT))
    run([*ELASTIC, str(tmp_path / "syncbn.py"), str(tmp_path / "two.json")], tmp_path, PYTHONPATH=str(ROOT))
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a.keys() == b.keys() and len(a) > 2
    import torch

    eps = torch.finfo(torch.float64).eps
    for key in a:
        for x, y in zip(a[key], b[key]):
            x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
            assert torch.allclose(x, y, rtol=1e3 * eps, atol=1e3 * eps), key  # a few ulps of a 1024-term sum
    run([*ELASTIC, str(tmp_path / "syncbn.py"), str(tmp_path / "own.json")], tmp_path, PYTHONPATH=str(ROOT),
        NO_SYNC="1")  # each process's own statistics: another model
    own = json.loads((tmp_path / "own.json").read_text())
    key = next(k for k in a if k.endswith("running_var"))
    assert not torch.allclose(torch.tensor(own[key]), torch.tensor(a[key]), rtol=1e-3)
