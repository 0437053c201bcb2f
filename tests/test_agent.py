"""W&B's own agent (wandb/wandb_agent.py, class Agent) running a demo sweep run through kd.sweep.launch, offline.

What is replaced, and only that: the W&B server (tests/fake_wandb_server.py: the three GraphQL answers). Everything
else is wandb's code: the agent builds the command from the spec (``create_sweep_command`` /
``create_sweep_command_args``), starts it with its own ``AgentProcess`` (``subprocess.Popen``, a new process
group) and stops it: ``stop`` is ``AgentProcess.terminate`` (SIGTERM to the launcher only), ``exit`` (a cancel)
is ``AgentProcess.kill`` (SIGKILL), and with ``--forward-signals`` the agent passes its own signals on. The
agent's poll interval is shortened from 5 s. Each stop is made to arrive during training: the program is paused
at its first checkpoint until the stop signal is pending on it.

* In this process: the agent stops the run, W&B requeues it, the rerun resumes the same W&B run.
* Under ``make agents`` (a stand-in venv whose ``bin/wandb`` runs W&B's own ``wandb agent`` command line against
  the fake server): Ctrl-C or SIGTERM to make, with 1 and 2 processes per run: the run checkpoints, marks its
  W&B run preempting and exits 143, the agent ends, and no process it started is left; a cancel leaves a
  checkpoint, a run marked preempting, and no process either.

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
from kd.wandb_runs import inspect_history, inspect_summary, leet_records, offline_folders
from tests.conftest import ROOT, offline_env
from tests.fake_wandb_server import RUN_ID, FakeServer, as_a_terminal_job, install, signal_state, tagged

DEMO = ROOT / "sweeps" / "demo" / "teachers.yaml"
FAKE = ROOT / "tests" / "fake_wandb_server.py"


# ------------------------------------------------------------------------------------------ the launcher
PROGRAM = r'''
import json, os, signal, sys, time
LINGER = float(os.environ.get("LINGER", "0"))  # after the first stop signal, note the others for this long
IGNORE = bool(os.environ.get("IGNORE_TERM"))  # never end on a stop signal
got = []
def on(signum, frame):
    got.append(signum)
    print("stopped by", signum, flush=True)
    if not (LINGER or IGNORE):
        sys.exit(128 + signum)
signal.signal(signal.SIGTERM, on)
signal.signal(signal.SIGINT, on)
print(json.dumps({"argv": sys.argv[1:], "pid": os.getpid(), "pgid": os.getpgid(0), "ppid": os.getppid(),
                  "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}), flush=True)
end = time.monotonic() + float(os.environ.get("SLEEP", "0"))
while time.monotonic() < end:
    if got and LINGER:
        time.sleep(LINGER)
        print("signals", got, flush=True)
        sys.exit(128 + got[0])
    time.sleep(0.01)
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


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (state := launch_state(pid)) not in (None, "Z"):
        assert time.monotonic() < deadline, f"program {pid} outlived its launcher ({state})"
        time.sleep(0.05)


def test_a_killed_launcher_has_its_program_stopped_with_sigterm(tmp_path):
    """The agent's `exit` (a cancel) SIGKILLs the launcher: its watcher sends the program SIGTERM, so it checkpoints
    and ends, instead of dying with no checkpoint or running on unwatched."""
    proc = start_launcher(tmp_path, SLEEP="60")
    pid = first_line(proc)["pid"]
    proc.kill()
    out, err = proc.communicate(timeout=60)  # the program and the watcher hold the pipes until they end
    wait_gone(pid)
    assert "stopped by 15" in out  # the program's own handler ran: it would have checkpointed
    assert "the launcher was killed: SIGTERM to the run's process group" in err


def test_only_the_first_stop_signal_is_passed_on_and_usr1_is_no_stop(tmp_path):
    proc = start_launcher(tmp_path, SLEEP="60", LINGER="1")
    first_line(proc)
    proc.send_signal(signal.SIGUSR1)  # `wandb agent --forward-signals` forwards every signal it gets
    time.sleep(0.5)
    assert proc.poll() is None
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):  # a scheduler's, then the agent's, then a Ctrl-C
        proc.send_signal(sig)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "signals [15]" in out  # one SIGTERM reached the program, nothing else
    assert err.count("the run is stopping already (SIGTERM)") == 2


@pytest.mark.parametrize("stopped_first", [True, False])
def test_a_program_that_does_not_end_is_killed_the_grace_after_its_stop(tmp_path, stopped_first):
    proc = start_launcher(tmp_path, SLEEP="120", IGNORE_TERM="1", KD_STOP_GRACE_S="2")
    pid = first_line(proc)["pid"]
    if stopped_first:  # the agent's `stop`, then its kill 30 s later
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
    proc.kill()
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=60)
    wait_gone(pid)
    assert out.count("stopped by 15") == 1  # one SIGTERM (the launcher's or its watcher's), then SIGKILL
    assert "still runs 2 s after its stop: SIGKILL" in err
    assert time.monotonic() - t0 < 20


def test_a_bad_stop_grace_is_one_line(tmp_path):
    for bad in ("0", "abc", "nan", "1e9"):
        proc = start_launcher(tmp_path, KD_STOP_GRACE_S=bad)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and out == ""
        (line,) = err.splitlines()
        assert line.startswith(f"error: KD_STOP_GRACE_S='{bad}' must be a number of seconds from 1 to 86400")


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
    from wandb.sdk import wandb_login

    monkeypatch.setattr(wandb, "Api", wandb.Api)  # restored afterwards: install() replaces both
    monkeypatch.setattr(wandb_login, "_login", wandb_login._login)
    install(server)
    agent = wandb_agent.Agent(server, queue.Queue(), sweep_id="sweep1")
    agent.POLL_INTERVAL = 0.2
    server.agent = agent
    agent.run()
    assert server.phase == "done" and not server.result()["problem"], server.result()

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


# ------------------------------------------------------------------------------------------- under make agents
def fake_venv(folder: Path) -> Path:
    """A venv for make (VENV=): ``bin/wandb`` is W&B's command line against the fake server, ``bin/python`` this
    interpreter; its stamp is newer than pyproject.toml, so `setup` has nothing to do."""
    venv = folder / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, target in (("wandb", f'{sys.executable} {FAKE}'), ("python", sys.executable)):
        exe = venv / "bin" / name
        exe.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        exe.chmod(0o755)
    stamp = venv / ".installed-stamp"
    stamp.touch()
    newer = (ROOT / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (newer, newer))
    return venv


def agent_env(folder: Path, plan: str, processes: int) -> tuple[dict, str]:
    """The environment of a stand-in agent (fake_venv) whose server follows ``plan``, its run a tiny teacher that
    writes under ``folder`` only; and the tag of every process started with it."""
    spec = load_spec(DEMO)
    args = {**spec.grid[0], "epochs": {"value": 3}, "batch_size": {"value": 32},
            "out_dir": {"value": str(folder / "runs")}, "data_dir": {"value": str(folder / "data")}}
    run = {"run_id": RUN_ID, "args": args, "program": str(ROOT / "train.py")}
    tag = f"{os.getpid()}-{folder.name}"
    env = {**os.environ, **offline_env(folder), "KD_TEST_TAG": tag, "KD_NUM_PROCESSES": str(processes),
           "KD_FAKE_SERVER": json.dumps({"sweep_yaml": DEMO.read_text(), "run": run, "folder": str(folder),
                                         "plan": plan})}
    for key in ("WANDB_RUN_ID", "WANDB_SERVICE", "WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH"):
        env.pop(key, None)
    return env, tag


def start_make_agents(folder: Path, plan: str, processes: int) -> tuple[subprocess.Popen, str]:
    """``make agents`` with one GPU's agent, as a user starts it (make in a session of its own, as a terminal's
    foreground job). Returns make and the tag every process it starts has."""
    env, tag = agent_env(folder, plan, processes)
    make = subprocess.Popen(["make", "agents", f"VENV={fake_venv(folder)}", "SWEEP=test-entity/kd-fidelity/sweep1",
                             "GPUS=0"], cwd=ROOT, env=env, start_new_session=True, preexec_fn=as_a_terminal_job,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return make, tag


def finish(make: subprocess.Popen, tag: str, timeout: float = 240) -> str:
    """make's output once it has ended, and once no process it started is left (a killed launcher's program
    outlives it while it checkpoints); a test that fails here kills what is left."""
    try:
        out, _ = make.communicate(timeout=timeout)
        end = time.monotonic() + 120
        while (left := tagged(tag)) and time.monotonic() < end:
            time.sleep(0.2)
        assert not left, f"processes left running: {[' '.join(cmdline(p)) for p in left]}\n{out[-3000:]}"
        return out
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
        for pid in tagged(tag):
            os.kill(pid, signal.SIGKILL)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def wait_paused(folder: Path, make: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not (folder / "paused").exists():
        assert make.poll() is None and time.monotonic() < end, "the run made no checkpoint: " + make.stdout.read()
        time.sleep(0.05)


def the_run_was_preempted(folder: Path, result: dict) -> None:
    """A new checkpoint since the pause (written at the stop), and the W&B run marked preempting, exit 143."""
    (pointer,) = folder.glob("runs/*/checkpoint.json")
    assert json.loads(pointer.read_text())["counter"] > result["first_checkpoint"]["counter"]
    (run,) = offline_folders(folder)
    records = leet_records(run)
    assert [r["type"] for r in records if r["type"] in ("preempting", "exit")] == ["preempting", "exit"]
    assert next(r for r in records if r["type"] == "exit")["exit"]["exit_code"] == 143
    assert not list(folder.glob("runs/*/done.json"))  # stopped, not finished


def stop_make_agents(tmp_path: Path, stop: str, processes: int) -> None:
    make, tag = start_make_agents(tmp_path, "outside", processes)
    wait_paused(tmp_path, make)
    before = signal_state(make.pid)
    if stop == "ctrl-c":
        os.killpg(make.pid, signal.SIGINT)  # the terminal signals the whole foreground group
    else:
        make.send_signal(signal.SIGTERM)  # a scheduler stopping make alone
    out = finish(make, tag)
    result = json.loads((tmp_path / "agent-result.json").read_text())
    assert result["forward_signals"] and not result["problem"], (result, before, out[-3000:])
    assert result["codes"] == [143], out[-3000:]  # the launcher: the run checkpointed on SIGTERM
    assert make.returncode != 0
    assert "pids=" not in out  # the recipe's loop is not echoed
    the_run_was_preempted(tmp_path, result)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_of_make_agents_preempts_the_run_and_leaves_no_process(tmp_path):
    stop_make_agents(tmp_path, "ctrl-c", 1)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stop,processes", [("sigterm", 1), ("ctrl-c", 2), ("sigterm", 2)])
def test_make_agents_stopped_preempts_the_run_and_leaves_no_process(tmp_path, stop, processes):
    stop_make_agents(tmp_path, stop, processes)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_cancel_leaves_a_checkpoint_a_preempted_run_and_no_process(tmp_path, processes):
    """``wandb sweep --cancel``: the agent SIGKILLs the launcher; its watcher SIGTERMs the program, which outlives
    the launcher just long enough to checkpoint and mark its W&B run preempting."""
    make, tag = start_make_agents(tmp_path, "cancel", processes)
    out = finish(make, tag)
    result = json.loads((tmp_path / "agent-result.json").read_text())
    assert result["phase"] == "stopping" and not result["problem"], (result, out[-3000:])
    assert result["codes"] == [-signal.SIGKILL], out[-3000:]
    assert "the launcher was killed: SIGTERM to the run's process group" in out
    the_run_was_preempted(tmp_path, result)
