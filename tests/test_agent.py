"""W&B's own agent (wandb/wandb_agent.py, class Agent) running a demo sweep run through kd.sweep.launch, offline.

What is replaced, and only that: the W&B server. The Agent talks to it through ``api._service_api.execute_graphql``
(wandb.apis.public.sweeps: ``_sweep_with_runs`` reads the sweep's YAML, ``_register_agent`` registers the agent,
``_agent_heartbeat`` returns the commands); :class:`FakeServer` answers those three queries from a fixed script
(run, then stop once the run has a checkpoint, then resume the same run id, then exit), as the sweep controller
would for a run stopped (``wandb sweep --stop``/``--cancel``, or a preemption) and then requeued. ``wandb.Api``,
which the agent calls again after each run ends, returns the same fake. Everything else is wandb's code: the
agent builds the command from the spec (``create_sweep_command`` / ``create_sweep_command_args``), starts it
with its own ``AgentProcess`` (``subprocess.Popen``, a new process group) and stops it with
``AgentProcess.terminate`` (SIGTERM to the launcher only). The agent's poll interval is shortened from 5 s.

The program is the real train.py (a tiny digits teacher), offline (WANDB_MODE=offline, runs under tmp_path).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kd.sweep import launch
from kd.sweep.spec import LAUNCH_COMMAND, load_spec
from kd.wandb_runs import inspect_history, inspect_summary, offline_folders
from tests.conftest import ROOT, offline_env

DEMO = ROOT / "sweeps" / "demo" / "teachers.yaml"
RUN_ID = "agentrun01"


# ------------------------------------------------------------------------------------------ the launcher
PROGRAM = r'''
import json, os, signal, sys, time
def on(signum, frame):
    print("stopped by", signum, flush=True)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, on)
signal.signal(signal.SIGINT, on)
print(json.dumps({"argv": sys.argv[1:], "pid": os.getpid(), "pgid": os.getpgid(0), "ppid": os.getppid(),
                  "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}), flush=True)
time.sleep(float(os.environ.get("SLEEP", "0")))
sys.exit(int(os.environ.get("CODE", "0")))
'''


def start_launcher(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen:
    (tmp_path / "prog.py").write_text(PROGRAM)
    full = {**os.environ, "CUDA_VISIBLE_DEVICES": "3", **env}
    full.pop("KD_NUM_PROCESSES", None)
    return subprocess.Popen([sys.executable, "-m", "kd.sweep.launch", "prog.py", *args], cwd=tmp_path, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def first_line(proc: subprocess.Popen) -> dict:
    return json.loads(proc.stdout.readline())


def test_the_launcher_passes_argv_env_and_exit_code_through(tmp_path):
    args = ["--seed=0", "--_wandb={'x': 1}", "--name=a b", "--flag", "positional"]
    proc = start_launcher(tmp_path, *args, CODE="3")
    seen = first_line(proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3 and err == ""
    assert seen["argv"] == args and seen["cuda"] == "3"  # unchanged, W&B's resume keys included
    assert seen["pgid"] == seen["pid"] != os.getpgid(0) and seen["ppid"] == proc.pid  # its own process group


@pytest.mark.parametrize("sent,received,code", [(signal.SIGTERM, 15, 143), (signal.SIGINT, 2, 130),
                                                (signal.SIGHUP, 15, 143)])
def test_the_launcher_passes_stop_signals_to_the_programs_group(tmp_path, sent, received, code):
    proc = start_launcher(tmp_path, SLEEP="60")
    first_line(proc)
    proc.send_signal(sent)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"stopped by {received}" in out  # the program's own handler ran: it would have checkpointed
    (line,) = err.splitlines()
    assert line.startswith(f"kd.sweep.launch: {signal.Signals(sent).name}: passing ")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_launcher_takes_its_program_with_it(tmp_path):
    """The agent's `kill` (after 30 s, or on `exit`) SIGKILLs the launcher: the program must not run on unwatched."""
    proc = start_launcher(tmp_path, SLEEP="60")
    pid = first_line(proc)["pid"]
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while (state := launch_state(pid)) not in (None, "Z"):
        assert time.monotonic() < deadline, f"program {pid} outlived its launcher ({state})"
        time.sleep(0.05)


def launch_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_one_process_unless_asked_for_more(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("KD_NUM_PROCESSES", raising=False)
    assert launch.child_argv("train.py", ["--seed=1"]) == [sys.executable, "train.py", "--seed=1"]
    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump({"distributed_type": "NO", "num_processes": 1}))
    assert launch.child_argv("train.py", []) == [sys.executable, "train.py"]  # a 1-process config: direct
    config.write_text(yaml.safe_dump({"distributed_type": "MULTI_GPU", "num_processes": 4, "gpu_ids": "0,1,2,3"}))
    capsys.readouterr()
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 4)  # without GPUs, one process per core at most
    elastic = [sys.executable, "-m", "kd.sweep.elastic", "--standalone", "--nproc_per_node"]
    assert launch.child_argv("train.py", ["--seed=1"]) == [*elastic, "4", "train.py", "--seed=1"]  # no gpu_ids
    (line,) = capsys.readouterr().err.splitlines()  # the config that asks for more is named, in one line
    assert f"4 processes (the Accelerate config {config}; KD_NUM_PROCESSES=1 for one)" in line
    monkeypatch.setenv("KD_NUM_PROCESSES", "2")
    assert launch.child_argv("train.py", []) == [*elastic, "2", "train.py"]
    monkeypatch.setenv("KD_NUM_PROCESSES", "1")
    assert launch.child_argv("train.py", []) == [sys.executable, "train.py"]
    assert "2 processes (KD_NUM_PROCESSES; KD_NUM_PROCESSES=1 for one)" in capsys.readouterr().err
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("KD_NUM_PROCESSES", bad)
        assert launch.main(["train.py"]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: KD_NUM_PROCESSES='{bad}' must be a whole number >= 1")
    assert launch.main(["--seed=1"]) == 2 and "the first argument must be the program" in capsys.readouterr().err


def test_several_processes_are_checked_once_before_any_worker_starts(tmp_path, monkeypatch, capsys):
    """A bad flag, a process count over the machine's cores (no GPUs here) or a config asking for 100000
    processes: one line, exit 2, and no launcher or worker started."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    started = []
    monkeypatch.setattr(launch.Launch, "run", lambda self: started.append(self.cmd) or 0)
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("KD_NUM_PROCESSES", "2")
    assert launch.main(["train.py", "--dataset=bogus"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: unknown dataset 'bogus'")
    monkeypatch.setenv("KD_NUM_PROCESSES", "3")
    assert launch.main(["train.py"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "asks for 3 processes per run on a machine without GPUs and 2 CPU cores" in line
    monkeypatch.delenv("KD_NUM_PROCESSES")
    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump({"num_processes": 100000}))
    assert launch.main(["train.py"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "asks for num_processes: 100000, over 1024" in line
    assert started == []


def test_wandb_passes_the_launcher_command_through():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command

    spec = load_spec(DEMO)
    assert spec.command == LAUNCH_COMMAND
    assert create_sweep_command(list(spec.command)) == LAUNCH_COMMAND  # "-m", "kd.sweep.launch" unchanged


# ------------------------------------------------------------------------------------------- W&B's agent
class FakeServer:
    """The W&B server as the Agent sees it: the three GraphQL calls, answered from a fixed script."""

    def __init__(self, sweep_yaml: str, run: dict, folder: Path):
        self.settings = {"entity": "test-entity", "project": "kd-fidelity"}
        self._service_api = self
        self.sweep_yaml, self.run, self.folder = sweep_yaml, run, folder
        self.agent = None
        self.phase = "new"
        self.procs: list = []  # the agent's AgentProcess of each attempt
        self.seen: dict = {}  # what ran, read from /proc while the first attempt runs
        self.deadline = time.monotonic() + 240
        self.problem = ""

    def execute_graphql(self, query: str, variables: dict | None = None, timeout=None) -> dict:
        if "SweepWithRuns" in query:
            return {"project": {"sweep": {"name": "sweep1", "config": self.sweep_yaml, "runs": {"edges": []}}}}
        if "CreateAgent" in query:
            return {"createAgent": {"agent": {"id": "agent1"}}}
        assert "Heartbeat" in query, query
        commands = self.heartbeat(json.loads(variables["runState"]))
        return {"agentHeartbeat": {"agent": {"id": "agent1"}, "commands": json.dumps(commands)}}

    def heartbeat(self, running: dict) -> list[dict]:
        proc = self.agent._run_processes.get(RUN_ID)
        if proc is not None and proc not in self.procs:
            self.procs.append(proc)
        if time.monotonic() > self.deadline:
            self.problem = self.problem or f"timed out in phase {self.phase}"
            return [{"type": "exit"}]
        if self.phase == "new":
            self.phase = "first"
            return [{"type": "run", **self.run}]
        if self.phase == "first":
            if RUN_ID not in running:
                self.problem = "the first attempt ended before it was stopped"
                return [{"type": "exit"}]
            if not list(self.folder.glob("runs/teacher-*/checkpoint.json")):
                return []
            self.seen = seen_processes(proc._popen.pid)
            self.phase = "stopping"
            return [{"type": "stop", "run_id": RUN_ID}]  # -> Agent._command_stop -> AgentProcess.terminate
        if RUN_ID in running:
            return []
        if self.phase == "stopping":
            self.phase = "resumed"
            return [{"type": "resume", **self.run}]  # the preempted run, requeued with its run id
        self.phase = "done"
        return [{"type": "exit"}]


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def seen_processes(launcher: int) -> dict:
    """The launcher's and the program's argv and process groups, from /proc."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == launcher:
                return {"launcher": cmdline(launcher), "launcher_pgid": os.getpgid(launcher),
                        "program": cmdline(int(entry.name)), "program_pid": int(entry.name),
                        "program_pgid": int(fields[2])}
    return {"launcher": cmdline(launcher)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_wandb_agent_stop_checkpoints_and_the_rerun_resumes_the_same_run(tmp_path, monkeypatch):
    import wandb
    from wandb import wandb_agent
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    for k, v in offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # `make agent`
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")  # as run_agent sets it
    for key in ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # the agent sets these; monkeypatch restores them
        monkeypatch.setenv(key, "placeholder")
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    monkeypatch.chdir(tmp_path)

    spec = load_spec(DEMO)
    args = {**spec.grid[0], "epochs": {"value": 3}, "batch_size": {"value": 32}}  # 12 steps an epoch (360 images)
    program = str(ROOT / "train.py")  # the agent runs in tmp_path here, not in the repository root
    server = FakeServer(DEMO.read_text(), {"run_id": RUN_ID, "args": args, "program": program}, tmp_path)
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: server)
    agent = wandb_agent.Agent(server, queue.Queue(), sweep_id="sweep1")
    agent.POLL_INTERVAL = 0.2
    server.agent = agent
    agent.run()
    assert not server.problem and server.phase == "done", server.problem

    # the argv: what wandb's builder makes of the spec's command, through the launcher to train.py unchanged
    flags = create_sweep_command_args({"args": args})["args"]
    seen = server.seen
    assert seen["launcher"] == ["python", "-m", "kd.sweep.launch", program, *flags]  # after /usr/bin/env
    assert seen["program"][1:] == [program, *flags]
    assert seen["program_pgid"] == seen["program_pid"] != seen["launcher_pgid"]
    (run_dir,) = tmp_path.glob("runs/teacher-digits-hard-preresnet8-s0-*")
    config = json.loads((run_dir / "config.json").read_text())
    assert {k: config[k] for k in args} == {k: v["value"] for k, v in args.items()}

    # the stop: SIGTERM to the launcher -> a checkpoint, exit 143; the rerun: the same run, to the end
    first, second = (p._popen.returncode for p in server.procs)
    assert (first, second) == (143, 0)
    assert json.loads((run_dir / "done.json").read_text())["run_id"] == RUN_ID
    folders = [f for f in offline_folders(tmp_path) if f.name.endswith(f"-{RUN_ID}")]
    assert len(folders) == 2 == len(offline_folders(tmp_path))  # one W&B run id, two processes
    assert {inspect_summary(f)["run_id"] for f in folders} == {RUN_ID}
    steps = [[row["_step"] for row in inspect_history(f)] for f in folders]
    assert sorted(steps[0] + steps[1]) == [1, 2, 3]  # no step logged twice, none lost
    assert steps[0] and max(steps[0]) < min(steps[1])  # the rerun continued where the first left off
