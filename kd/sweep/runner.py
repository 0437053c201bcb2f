"""The offline runner's loop: claim a run in the shared state, run its command as ``wandb agent`` would, note it.

Each run is a child process in its own session, started in the repository root with the virtualenv's ``bin``
first on PATH and the agent's environment (:meth:`Runner.child_env`). A run whose program exits 143 (it
checkpointed on a SIGTERM it did not get from this runner: a preemption) is rerun at once under the same
W&B run id, as W&B's agent reruns a preempting run; a run that fails is noted, and retried by the next call.

Several runners share one spec's grid (one per GPU, on one machine or, under SLURM, on many sharing a file
system: slurm/agents.sbatch): each claims the next run nobody holds and moves on past runs that others hold,
so no run waits for another. A claim records its runner's host and pid, and under SLURM its job and restart
count (``SLURM_JOB_ID``, ``SLURM_RESTART_COUNT``): a claim whose runner is gone (its pid, on this host; or an
earlier start of this same SLURM job, on any host, since SLURM starts a requeued job only once the last start
has ended) is taken over and its run resumed; a claim by a live runner elsewhere is left to it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kd import faults
from kd.errors import Interrupted, KDError
from kd.sweep.processes import group_alive, pid_alive, process_start, stop_group
from kd.sweep.spec import Spec, build_argv, run_label, sweeps_engine
from kd.sweep.state import State, now
from kd.wandb_runs import new_run_id

PREEMPTED = 128 + signal.SIGTERM  # the programs' exit code after a checkpoint on SIGTERM
PREEMPT_RERUNS = 3  # reruns of one preempted run in one call, then it is left for the next call
CLAIMABLE = ("pending", "failed", "interrupted")


def raise_stop(signum, frame):
    raise Interrupted(signum)



def last_error(log: Path, tail_bytes: int = 65536) -> str:
    """The cause a failed run printed last: its last ``error: ...`` line (the programs' one-line errors), else its
    last line of output; from the end of its latest attempt in the log, at most 300 characters."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - tail_bytes))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.split("\n=== ")[-1].replace("\r", "\n").splitlines()[1:] if line.strip()]
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    cause = errors[-1] if errors else lines[-1] if lines else ""
    return cause[:300]


def fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def slurm_job() -> dict | None:
    """This process's SLURM job and how often SLURM started it before (requeues), where it runs in one."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if not job:
        return None
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return {"job": job, "restart": int(restart) if restart.isdigit() else 0}


def _engine_state(status: str) -> str:
    return {"finished": "finished", "failed": "failed", "running": "running"}.get(status, "pending")


class Runner:
    def __init__(self, spec: Spec, state_dir: Path, root: Path, count: int | None, keep_going: bool):
        self.spec = spec
        self.state = State(state_dir, spec)
        self.root = root
        self.count = count
        self.keep_going = keep_going
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pid_start = process_start(self.pid)
        self.tried: set[str] = set()  # keys this runner attempted: a failed run is retried in the next call
        self.preempted: dict[str, int] = {}  # reruns of preempted runs in this call
        self.durations: list[float] = []
        self.ran = 0
        self.failed: list[dict] = []

    # -- claiming, under the lock
    def _gone(self, claim: dict) -> bool:
        """Whether the runner that claimed a running run is gone."""
        mine, theirs = slurm_job(), claim.get("slurm")
        if mine and theirs and mine["job"] == theirs["job"]:
            return theirs["restart"] < mine["restart"]  # an earlier start of this job: ended before this one began
        return claim.get("host") == self.host and not pid_alive(claim["pid"], claim.get("pid_start"))

    def _pick(self, runs: list[dict]) -> tuple[dict | None, dict | None]:
        for r in runs:
            if r["key"] in self.tried:
                continue
            if r["status"] == "running":
                if not self._gone(r):
                    continue  # another live runner owns it (or one on another host: left alone)
                return r, dict(r)
            if r["status"] in CLAIMABLE:
                return r, None
        return None, None

    def claim(self) -> tuple[dict, dict | None] | None:
        """The next run to do, marked running by this process; with the stale claim it replaces, if any."""
        with self.state.locked() as data:
            runs = data["runs"]
            pick, stale = self._pick(runs)
            if pick is None:
                pick = self._propose(runs)
                if pick is None:
                    return None
            pick.update(status="running", pid=self.pid, pid_start=self.pid_start, host=self.host,
                        slurm=slurm_job(), started_at=now(), ended_at=None, returncode=None, pgid=None,
                        attempts=pick.get("attempts", 0) + 1)
            pick["run_id"] = pick.get("run_id") or new_run_id()
            json_file = str(self.params_path(pick["run_id"], ".json"))
            pick["argv"] = build_argv(self.spec, pick["config"], json_file)
            self.tried.add(pick["key"])
            position = sum(r["status"] in ("finished", "running") for r in runs)
            return {**pick, "_position": position}, stale

    def _propose(self, runs: list[dict]) -> dict | None:
        cap = self.spec.config.get("run_cap")
        if cap is not None and len(runs) >= cap:
            return None
        sweeps = sweeps_engine()
        done = [sweeps.SweepRun(name=r["key"], state=_engine_state(r["status"]), config=r["config"])
                for r in runs]
        proposed = sweeps.next_run(self.spec.config, done, validate=False)  # grid: the first config not held
        config = proposed.config if proposed is not None else None
        if config is None:
            return None
        slug = "_".join(f"{k}{config[k]['value']}" for k in self.spec.varying() if k in config)
        slug = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in slug)[:100]
        run = {"key": f"{len(runs):03d}" + (f"-{slug}" if slug else ""), "config": config,
               "params": {k: v["value"] for k, v in config.items()}, "status": "pending", "attempts": 0,
               "run_id": None}
        run["log"] = f"{run['key']}.log"
        runs.append(run)
        return run

    def update(self, key: str, **values) -> None:
        with self.state.locked() as data:
            for r in data["runs"]:
                if r["key"] == key:
                    r.update(values)
                    return
            raise KDError(f"run {key} vanished from {self.state.path}: was the file edited during the sweep?")

    def params_path(self, run_id: str, suffix: str) -> Path:
        return self.state.folder / f"config-{run_id}{suffix}"

    # -- one run
    def child_env(self, run: dict) -> dict:
        from wandb.sdk.lib import config_util

        env = dict(os.environ)
        venv_bin = os.path.dirname(sys.executable)
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        env.setdefault("WANDB_DIR", str(self.root))
        env["WANDB_RUN_ID"] = run["run_id"]
        param_path = self.params_path(run["run_id"], ".yaml")
        config_util.save_config_file_from_dict(str(param_path), run["config"])  # the agent's writer
        env["WANDB_SWEEP_PARAM_PATH"] = str(param_path)
        if "${args_json_file}" in self.spec.command:
            from kd.io import atomic_write

            with atomic_write(self.params_path(run["run_id"], ".json"), "w") as fh:
                fh.write(json.dumps({k: v["value"] for k, v in run["config"].items()}))
        for key in ("project", "entity"):
            if self.spec.config.get(key):
                env[f"WANDB_{key.upper()}"] = str(self.spec.config[key])
        env["KD_SWEEP_ID"] = self.spec.sweep_id
        env.pop("WANDB_SWEEP_ID", None)  # see the package docstring
        env.pop("WANDB_SERVICE", None)  # as the agent does: a run's own wandb-core dies with it, so a rerun of a
        # killed run can take its run id again (a shared one keeps the id "in use")
        return env

    def execute(self, run: dict) -> int:
        log_path = self.state.folder / run["log"]
        env = self.child_env(run)
        with open(log_path, "ab") as log:
            log.write(f"\n=== {now()} attempt {run['attempts']} pid {self.pid} on {self.host}: "
                      f"{shlex.join(run['argv'])}\n".encode())
            log.flush()
            try:
                child = subprocess.Popen(run["argv"], cwd=self.root, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
            except OSError as e:
                log.write(f"could not start: {e}\n".encode())
                return 127
        try:
            self.update(run["key"], pgid=child.pid)
            return child.wait()
        except Interrupted as stop:
            print(f"{stop}: stopping {run['key']} (its program checkpoints on SIGTERM)...", file=sys.stderr)
            stop_group(child.pid)
            child.wait()
            self.update(run["key"], status="interrupted", ended_at=now(), returncode=child.returncode)
            raise

    # -- the loop
    def loop(self) -> int:
        started = time.monotonic()
        total = self.spec.total(None)
        print(f"sweep {self.spec.sweep_id}: {total if total is not None else '?'} runs of {self.spec.program} "
              f"in {self.root}; state and logs in {self.state.folder}", flush=True)
        while self.count is None or self.ran < self.count:
            claimed = self.claim()
            if claimed is None:
                break
            run, stale = claimed
            if stale and stale.get("pgid") and stale.get("host") == self.host and group_alive(stale["pgid"]):
                print(f"run {run['key']} was cut off (runner pid {stale['pid']} is gone) but its program "
                      f"still runs: stopping process group {stale['pgid']} before rerunning", file=sys.stderr)
                stop_group(stale["pgid"])
            print(self._progress(run, total), flush=True)
            t0 = time.monotonic()
            faults.point("sweep-claimed")  # claimed in the state, its program not started
            code = self.execute(run)
            faults.point("sweep-exited")  # the program ended, the state still says running
            if not self._note(run, code, time.monotonic() - t0):
                return 1
        return self.summary(time.monotonic() - started)

    def _progress(self, run: dict, total: int | None) -> str:
        remaining = (total - run["_position"] + 1) if total is not None else None
        if self.count is not None:
            remaining = min(remaining or self.count, self.count - self.ran)
        eta = ""
        if self.durations and remaining is not None:
            eta = f" (eta {fmt_duration(sum(self.durations) / len(self.durations) * remaining)})"
        again = f" [attempt {run['attempts']}]" if run["attempts"] > 1 else ""
        return (f"[{run['_position']}/{total if total is not None else '?'}] running {self.spec.program} "
                f"{run_label(self.spec, run['config'])}{again}{eta}")

    def _note(self, run: dict, code: int, took: float) -> bool:
        """Record how a run ended; whether the loop goes on."""
        key = run["key"]
        if code == PREEMPTED and self.preempted.get(key, 0) < PREEMPT_RERUNS:
            self.preempted[key] = self.preempted.get(key, 0) + 1
            self.update(key, status="interrupted", returncode=code, ended_at=now(), preempted=True)
            self.tried.discard(key)  # claimed again next, with the same run id: the program resumes
            print(f"run {key} was preempted (exit {code}: its program checkpointed on a SIGTERM): rerunning it "
                  f"under the same W&B run id {run['run_id']}", file=sys.stderr, flush=True)
            return True
        self.durations.append(took)
        self.ran += 1
        status = "finished" if code == 0 else "interrupted" if code == PREEMPTED else "failed"
        self.update(key, status=status, returncode=code, ended_at=now(), duration_s=round(took, 3))
        if code == 0:
            return True
        log = self.state.folder / run["log"]
        why = f"was preempted {PREEMPT_RERUNS + 1} times" if code == PREEMPTED else f"failed with exit code {code}"
        cause = last_error(log) if code != PREEMPTED else ""
        print(f"error: run {key} {why}{f': {cause}' if cause else ''}; command {shlex.join(run['argv'])} (log: {log})",
              file=sys.stderr, flush=True)
        self.failed.append(run)
        return self.keep_going

    def summary(self, took: float) -> int:
        runs = (self.state.peek() or {"runs": []})["runs"]
        done = sum(r["status"] == "finished" for r in runs)
        total = self.spec.total(None)
        elsewhere = [r for r in runs if r["status"] == "running"]
        failed = [r for r in runs if r["status"] == "failed"]
        parts = [f"sweep {self.spec.sweep_id}: {done}/{total if total is not None else len(runs)} finished",
                 f"this call ran {self.ran} in {fmt_duration(took)}"]
        if failed:
            logs = ", ".join(str(self.state.folder / r["log"]) for r in failed)
            parts.append(f"{len(failed)} failed ({logs})")
        if elsewhere:
            parts.append(f"{len(elsewhere)} running in other runners ("
                         + ", ".join(f"{r['key']}: pid {r['pid']} on {r['host']}" for r in elsewhere) + ")")
        print("; ".join(parts) + f"; state {self.state.path}", flush=True)
        return 1 if self.failed else 0
