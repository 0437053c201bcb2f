"""``make slurm`` on a real SLURM cluster: one slurmctld and one slurmd on this machine (slurm/local-cluster.sh).

``make test-slurm`` installs SLURM where it is absent, starts the cluster in a temporary folder, runs these
tests and stops it; ``make chaos`` runs them too where slurmctld and slurmd are installed (with a cluster of
their own). Without SLURM they fail with one line naming ``make test-slurm``, never pass unseen.

The job is the offline runner (``make slurm SPEC=...``): two tasks (two "GPUs": CUDA_VISIBLE_DEVICES=0,1 is
visible to the job, each task takes its own) share a grid of tiny digits teachers, everything written under
tmp_path. Checked:

* ``scontrol requeue`` mid-run (SLURM's own stop: SIGTERM to every process of the job): the job starts again
  from the top, every run of the grid trains once, and the runs it cut off resume from their checkpoints: their
  epochs continue, none is trained or logged twice, in the same W&B run;
* the time limit: GRACE seconds before it, SLURM signals the batch shell, every run gets one SIGTERM,
  checkpoints, marks its W&B run preempting and exits 143, and the job requeues itself;
* ``make slurm-stop``: the same stop, and the job ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from kd.wandb_runs import inspect_history, leet_records, offline_folders
from tests.conftest import ROOT, offline_env
from tests.fake_wandb_server import tagged
from tests.test_agent import agent_env, fake_venv, the_run_was_preempted

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
CLUSTER = ROOT / "slurm" / "local-cluster.sh"
LAUNCH = ["${env}", "${interpreter}", "-m", "kd.sweep.launch", "${program}", "${args}"]


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory):
    """The test cluster's slurm.conf: the one `make test-slurm` started (KD_TEST_SLURM_CONF), else one of its own."""
    missing = [exe for exe in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol") if shutil.which(exe) is None]
    if missing:
        pytest.fail(f"SLURM is not installed ({', '.join(missing)} not on PATH): run `make test-slurm`, which "
                    "installs it (apt-get install slurm-wlm munge)", pytrace=False)
    if os.environ.get("KD_TEST_SLURM_CONF"):
        yield Path(os.environ["KD_TEST_SLURM_CONF"])
        return
    folder = tmp_path_factory.mktemp("slurm-cluster")
    subprocess.run([str(CLUSTER), "start", str(folder)], check=True, timeout=120)
    try:
        yield folder / "slurm.conf"
    finally:
        subprocess.run([str(CLUSTER), "stop", str(folder)], timeout=300)


class Job:
    """One ``make slurm ...`` job writing under ``folder``, and the cluster's view of it."""

    def __init__(self, folder: Path, conf: Path, env: dict, tag: str, *make_args: str):
        self.folder, self.conf, self.tag = folder, conf, tag
        self.env = {**env, "SLURM_CONF": str(conf), "CUDA_VISIBLE_DEVICES": "0,1", "KD_TEST_TAG": tag}
        out = subprocess.run(["make", "slurm", "NODES=1", f"SLURM_DIR={folder / 'slurm'}", *make_args],
                             cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        self.id = re.search(r"Submitted batch job (\d+)", out.stdout).group(1)

    @classmethod
    def spec(cls, folder: Path, conf: Path, epochs: int, seeds: list[int], time_limit: str, grace: int) -> Job:
        """The offline runners of a grid of tiny digits teachers, two tasks (two "GPUs") on the node."""
        spec = {"program": "train.py", "method": "grid", "metric": {"name": "test/acc", "goal": "maximize"},
                "parameters": {"dataset": {"value": "digits"}, "arch": {"value": "preresnet8"},
                               "epochs": {"value": epochs}, "batch_size": {"value": 32}, "seed": {"values": seeds},
                               "out_dir": {"value": str(folder / "runs")},
                               "data_dir": {"value": str(folder / "data")}},
                "command": LAUNCH}
        path = folder / "grid.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        env = {**os.environ, **offline_env(folder)}
        for key in ("WANDB_RUN_ID", "WANDB_SERVICE", "KD_NUM_PROCESSES"):
            env.pop(key, None)
        return cls(folder, conf, env, f"{os.getpid()}-{folder.name}", f"SPEC={path}", "GPUS_PER_NODE=0",
                   "TASKS_PER_NODE=2", f"TIME={time_limit}", f"GRACE={grace}", f"ARGS=--state_dir={folder / 'state'}")

    def slurm(self, *cmd: str) -> str:
        out = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{cmd}: {out.stderr}"
        return out.stdout

    def info(self) -> dict:
        """``scontrol show job``'s fields (JobState, Reason, Restarts, ExitCode, ...)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.slurm("scontrol", "show", "job", self.id)))

    def output(self) -> str:
        (log,) = (self.folder / "slurm").glob(f"*-{self.id}.out")
        return log.read_text()

    def state(self) -> list[dict]:
        path = self.folder / "state" / "state.json"
        return json.loads(path.read_text())["runs"] if path.exists() else []

    def wait(self, what: str, predicate, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < end, f"job {self.id}: timed out waiting for {what}: {self.info()}\n" + \
                self.output()[-4000:]
            time.sleep(1)

    def release(self) -> None:
        """SLURM holds a requeued job for 2 minutes (its BeginTime): start it as soon as the node is free."""
        self.wait("the requeued job to be pending", lambda: self.info()["JobState"] in ("PENDING", "RUNNING"))
        if self.info()["JobState"] == "PENDING":
            self.slurm("scontrol", "update", f"JobId={self.id}", "StartTime=now")

    def ended(self) -> bool:
        return self.info()["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

    def no_process_left(self) -> None:
        end = time.monotonic() + 60
        while (left := tagged(self.tag)) and time.monotonic() < end:
            time.sleep(0.5)
        assert not left, f"processes of job {self.id} left running: {left}"

    def cleanup(self) -> None:
        subprocess.run(["scancel", self.id], env=self.env, capture_output=True, timeout=60)
        end = time.monotonic() + 90
        while tagged(self.tag) and time.monotonic() < end:
            time.sleep(0.5)
        for pid in tagged(self.tag):
            os.kill(pid, signal.SIGKILL)


def checkpoints(folder: Path) -> dict[str, dict]:
    """Each run folder's checkpoint pointer, by run folder name."""
    return {p.parent.name: json.loads(p.read_text()) for p in folder.glob("runs/*/checkpoint.json")}


def runs_by_id(folder: Path) -> dict[str, list[Path]]:
    """The offline W&B run folders under ``folder``, grouped by run id, in time order."""
    out: dict[str, list[Path]] = {}
    for f in offline_folders(folder):
        out.setdefault(f.name.rsplit("-", 1)[1], []).append(f)
    return out


def test_a_requeued_job_resumes_its_runs_from_their_checkpoints(tmp_path, slurm_conf):
    epochs = 40
    job = Job.spec(tmp_path, slurm_conf, epochs=epochs, seeds=[0, 1, 2], time_limit="30", grace=60)
    try:
        def cut_mid_run() -> bool:
            done = {p.parent.name for p in tmp_path.glob("runs/*/done.json")}
            return any(c["epoch"] >= 2 and name not in done for name, c in checkpoints(tmp_path).items())

        job.wait("a run to be mid-way", cut_mid_run)
        job.slurm("scontrol", "requeue", job.id)
        before = checkpoints(tmp_path)  # at least what the cut-off runs had saved
        job.release()
        job.wait("the requeued job to end", job.ended, timeout=900)
        info, log = job.info(), job.output()
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-4000:])
        assert log.count("tasks on ") == 2  # the batch script ran twice, from the top
        assert sorted(set(re.findall(r"CUDA_VISIBLE_DEVICES=(\d)\)", log))) == ["0", "1"], log[-4000:]
        job.no_process_left()

        runs = job.state()
        assert [r["status"] for r in runs] == ["finished"] * 3, runs
        assert len(list(tmp_path.glob("runs/*/done.json"))) == 3
        by_id = runs_by_id(tmp_path)
        assert len(by_id) == 3  # one W&B run per grid point
        resumed = 0
        for run in runs:
            run_dir = next(tmp_path.glob(f"runs/teacher-digits-preresnet8-s{run['params']['seed']}-*"))
            run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
            assert run["run_id"] == run_id == json.loads((run_dir / "done.json").read_text())["run_id"]
            history = json.loads((run_dir / "checkpoint.json").read_text())["history"]
            assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # each epoch trained once
            logged = sorted(row["epoch"] for f in by_id[run_id] for row in inspect_history(f))
            assert logged == list(range(1, epochs + 1))  # in its W&B run: each epoch once, none lost
            assert len(by_id[run_id]) == run["attempts"] in (1, 2), run  # a W&B folder per attempt, one run id
            attempts = (tmp_path / "state" / run["log"]).read_text()
            saved = before.get(run_dir.name)
            if run["attempts"] == 2 and saved and saved["epoch"] < epochs:  # cut off after a checkpoint
                (epoch, step) = map(int, re.search(rf"resuming {run_dir} at epoch (\d+) step (\d+)",
                                                   attempts).groups())
                assert (epoch, step) >= (saved["epoch"], saved["step"])  # from its checkpoint, not from scratch
                resumed += 1
            elif run["attempts"] == 1:
                assert "resuming" not in attempts
        assert resumed >= 1  # the run that was mid-way when the job was requeued
    finally:
        job.cleanup()


def preempted(job: Job, run: dict) -> None:
    """A run stopped by one SIGTERM: its state says so (exit 143), its program checkpointed, and its W&B run is
    marked preempting with exit code 143."""
    assert run["status"] == "interrupted" and run["returncode"] == 143, run
    assert "interrupted by SIGTERM: checkpoint saved" in (job.folder / "state" / run["log"]).read_text()
    (folder,) = runs_by_id(job.folder)[run["run_id"]]
    records = leet_records(folder)
    assert [r["type"] for r in records if r["type"] in ("preempting", "exit")] == ["preempting", "exit"]
    assert next(r for r in records if r["type"] == "exit")["exit"]["exit_code"] == 143


def both_running(job: Job) -> bool:
    return len(checkpoints(job.folder)) == 2


def test_the_time_limit_warning_preempts_every_run_and_requeues_the_job(tmp_path, slurm_conf):
    grace, limit_s = 60, 120
    job = Job.spec(tmp_path, slurm_conf, epochs=400, seeds=[0, 1], time_limit="2", grace=grace)
    try:
        job.wait("the job to start", lambda: job.info()["JobState"] == "RUNNING", timeout=300)
        started = time.monotonic()
        job.wait("the job to requeue itself", lambda: job.info()["Restarts"] == "1", timeout=limit_s + 60)
        stopped_after = time.monotonic() - started
        assert stopped_after < limit_s - 10, stopped_after  # stopped before the limit, not by it
        log = job.output()
        assert "time limit near" in log and "requeueing the job" in log, log[-4000:]
        assert log.count(": stop: SIGTERM to python") == 2 and log.count(": exit 143") == 2, log[-4000:]
        runs = job.state()
        assert len(runs) == 2 and all(c["epoch"] < 400 for c in checkpoints(tmp_path).values())
        for run in runs:
            preempted(job, run)
        assert job.info()["JobState"] in ("PENDING", "REQUEUED", "COMPLETING"), job.info()
    finally:
        job.cleanup()
    job.no_process_left()


def stop_the_job(job: Job) -> None:
    out = subprocess.run(["make", "slurm-stop", f"JOB={job.id}"], cwd=ROOT, env=job.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    job.wait("the job to end", job.ended, timeout=120)
    info, log = job.info(), job.output()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, log[-4000:])
    assert "make slurm-stop" in log and "requeueing" not in log, log[-4000:]


def test_make_slurm_stop_preempts_every_run_and_ends_the_job(tmp_path, slurm_conf):
    job = Job.spec(tmp_path, slurm_conf, epochs=400, seeds=[0, 1], time_limit="30", grace=60)
    try:
        job.wait("both runs to checkpoint", lambda: both_running(job), timeout=300)
        stop_the_job(job)
        for run in job.state():
            preempted(job, run)
        job.no_process_left()
    finally:
        job.cleanup()


def test_make_slurm_sweep_runs_a_forwarding_agent_whose_run_stops_as_a_preemption(tmp_path, slurm_conf):
    """``make slurm SWEEP=...``: the task runs W&B's own ``wandb agent --forward-signals`` (against the stand-in
    server of tests/fake_wandb_server.py, from a stand-in venv); ``make slurm-stop`` reaches the run through it."""
    env, tag = agent_env(tmp_path, "outside", 1)
    job = Job(tmp_path, slurm_conf, env, tag, "SWEEP=test-entity/kd-fidelity/sweep1", f"VENV={fake_venv(tmp_path)}",
              "GPUS_PER_NODE=0", "TASKS_PER_NODE=1", "TIME=30")
    try:
        job.wait("the run's first checkpoint", lambda: (tmp_path / "paused").exists(), timeout=300)
        stop_the_job(job)
        assert re.search(r"task 0 \(.*\): \S*/wandb agent --forward-signals test-entity/kd-fidelity/sweep1",
                         job.output()), job.output()[-4000:]
        result = json.loads((tmp_path / "agent-result.json").read_text())
        assert result["forward_signals"] and not result["problem"] and result["codes"] == [143], result
        the_run_was_preempted(tmp_path, result)
        job.no_process_left()
    finally:
        job.cleanup()
