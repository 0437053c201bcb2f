"""``make agents``: one ``wandb agent --forward-signals`` per GPU, each with its own CUDA_VISIBLE_DEVICES, in a
session of its own, all stopped by Ctrl-C or a SIGTERM to make with one SIGTERM each.

The dry run (``make -n``) shows the commands. The real run uses a stand-in ``wandb`` (VENV= points make at a
folder whose ``bin/wandb`` is a shell script that records its GPU, arguments, pid and session, and the signals it
gets: on SIGTERM it exits 143, as W&B's agent ends on SIGTERM once its run has ended); the rest is the
Makefile's recipe, run by make and sh. W&B's real agent under ``make agents``: tests/test_agent.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fake_wandb_server import as_a_terminal_job, signal_state

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

AGENT = re.compile(r'CUDA_VISIBLE_DEVICES=(\S+) PATH="[^"]*/bin:\$PATH" setsid \S*/bin/wandb agent '
                   r'--forward-signals +(\S+)')


def test_dry_run_prints_one_forwarding_agent_per_gpu():
    out = subprocess.run(["make", "-n", "agents", "SWEEP=a/b/c", "GPUS=0,1"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert AGENT.findall(out) == [("0", "a/b/c"), ("1", "a/b/c")], out
    one = subprocess.run(["make", "-n", "agent", "SWEEP=a/b/c"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert re.search(r'PATH="[^"]*/bin:\$PATH" setsid \S*/bin/wandb agent --forward-signals +a/b/c &', one), one
    assert "CUDA_VISIBLE_DEVICES=" not in one  # `make agent` leaves the environment's as it is


@pytest.mark.parametrize("args,message", [(["SWEEP=a/b/c"], "pass GPUS="), (["GPUS=0"], "pass SWEEP=")])
def test_sweep_and_gpus_are_required(tmp_path, args, message):
    venv = _fake_venv(tmp_path)
    done = subprocess.run(["make", "-s", "agents", f"VENV={venv}", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr


FAKE_WANDB = """#!/bin/sh
out="{out}/gpu-$CUDA_VISIBLE_DEVICES"
trap 'echo TERM >> "$out.signals"; exit 143' TERM
trap 'echo INT >> "$out.signals"' INT
echo "$$ $(ps -o sid= -p $$)" > "$out.pid"
echo "$*" > "$out.started"
while :; do sleep 0.05; done
"""


def _fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    wandb = venv / "bin" / "wandb"
    wandb.write_text(FAKE_WANDB.format(out=tmp_path))
    wandb.chmod(0o755)
    stamp = venv / ".installed-stamp"  # newer than pyproject.toml: `setup` has nothing to do
    stamp.touch()
    newer = (ROOT / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (newer, newer))
    return venv


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_every_agent(tmp_path, stop):
    venv = _fake_venv(tmp_path)
    make = subprocess.Popen(["make", "agents", f"VENV={venv}", "SWEEP=a/b/c", "GPUS=0,2,3",
                             "ARGS=--count=1"], cwd=ROOT, start_new_session=True, preexec_fn=as_a_terminal_job,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("gpu-*.started"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = {p.name: p.read_text().strip() for p in tmp_path.glob("gpu-*.started")}
        assert started == {f"gpu-{g}.started": "agent --forward-signals --count=1 a/b/c" for g in (0, 2, 3)}
        agents = [tuple(map(int, (tmp_path / f"gpu-{g}.pid").read_text().split())) for g in (0, 2, 3)]
        assert all(pid == sid != os.getsid(make.pid) for pid, sid in agents)  # each in a session of its own
        assert make.poll() is None  # make waits for its agents
        before = signal_state(make.pid)
        if stop == "ctrl-c":
            os.killpg(make.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        else:
            make.send_signal(signal.SIGTERM)  # a scheduler stopping make alone
        try:
            out, _ = make.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"make did not end after {stop} (make's signals before it: {before}); agents' "
                                 f"signals: {[p.read_text() for p in tmp_path.glob('gpu-*.signals')]}") from None
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
    signals = {p.name: p.read_text().split() for p in tmp_path.glob("gpu-*.signals")}
    assert signals == {f"gpu-{g}.signals": ["TERM"] for g in (0, 2, 3)}, out  # one SIGTERM each, no SIGINT
    assert make.returncode != 0
    assert "pids=" not in out and "wandb agent" not in out  # the recipe's loop is not echoed
    for pid, _ in agents:  # no agent left running
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
