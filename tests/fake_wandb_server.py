"""The W&B server as ``wandb agent`` sees it, for tests that run W&B's real agent (tests/test_agent.py).

What is replaced, and only that: the server. The Agent talks to it through ``api._service_api.execute_graphql``
(wandb.apis.public.sweeps: ``_sweep_with_runs`` reads the sweep's YAML, ``_register_agent`` registers the agent,
``_agent_heartbeat`` returns the commands); :class:`FakeServer` answers those three queries from a fixed plan.
``wandb.Api``, which the agent calls again after each run ends, returns the same fake. Everything else is
wandb's code: the agent builds the command from the spec, starts it with its own ``AgentProcess`` and stops it.

Plans (what the server tells the agent):

* ``stop-resume``: run; once the run is paused at its first checkpoint, ``stop`` (SIGTERM to the launcher,
  as for a run stopped for the sweep or preempted); once it has ended, ``resume`` with the same run id (W&B's
  requeue of a preempted run); once that has ended, ``exit``;
* ``outside``: run, then nothing: the stop comes from outside (``make agents`` stopped by Ctrl-C or SIGTERM);
* ``cancel``: run; once the run is paused at its first checkpoint, ``exit`` (``wandb sweep --cancel``: the
  agent SIGKILLs the launcher at once).

The stop is deterministic, not a race with the run's end: :class:`Pauser` SIGSTOPs the program (and its
processes) as soon as its first checkpoint exists, and SIGCONTs it only once the stop signal is pending on it,
so the signal always arrives during training, whatever the machine's speed.

``python tests/fake_wandb_server.py agent ARGS...`` (what tests/test_agent.py installs as a stand-in venv's
``bin/wandb``) runs W&B's own command line, ``wandb agent ARGS...``, against this server; the plan, run and
folder come from ``KD_FAKE_SERVER`` (JSON), and what happened is written to ``FOLDER/agent-result.json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

RUN_ID = "agentrun01"
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


# ------------------------------------------------------------------------------------------ the process table
def stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name: [state, ppid, pgid, sid, ...]; None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    fields = stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := stat(int(entry.name))) and int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def program_of(launcher: int) -> int | None:
    """The launcher's program: its child in a process group of its own (the watcher leads a session instead)."""
    for kid in children(launcher):
        fields = stat(kid)
        if fields and int(fields[2]) == kid != int(fields[3]):
            return kid
    return None


def sigterm_pending(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(m & SIGTERM_BIT for m in masks)


def tagged(tag: str) -> list[int]:
    """Live processes whose environment holds ``KD_TEST_TAG=tag``: every process a test started, however deep."""
    needle = f"KD_TEST_TAG={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in env and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def as_a_terminal_job() -> None:
    """preexec_fn for a command a test starts as a user would from a terminal: every signal at its default and
    unblocked (a test process may have inherited an ignored or blocked SIGINT, which make and sh would keep:
    a shell cannot trap a signal ignored on entry)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def signal_state(pid: int) -> str:
    """The ignored and blocked signal masks of ``pid`` (for a failure's message)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "gone"
    return " ".join(line.replace("\t", "") for line in status if line.startswith(("SigIgn", "SigBlk", "SigCgt")))


# ------------------------------------------------------------------------------------------ the pause
class Pauser(threading.Thread):
    """SIGSTOP the launcher's program and its processes at the run's first checkpoint; SIGCONT them once a
    SIGTERM is pending on the program (or it is gone)."""

    def __init__(self, launcher: int, folder: Path, timeout: float = 240):
        super().__init__(daemon=True)
        self.launcher, self.folder, self.timeout = launcher, folder, timeout
        self.paused = threading.Event()
        self.first_checkpoint: dict | None = None
        self.problem = ""

    def _wait(self, what: str, predicate, every: float) -> bool:
        end = time.monotonic() + self.timeout
        while not predicate():
            if time.monotonic() > end:
                self.problem = f"timed out waiting for {what}"
                return False
            time.sleep(every)
        return True

    def run(self) -> None:
        program = None

        def found() -> bool:
            nonlocal program
            program = program or program_of(self.launcher)
            return program is not None and any(self.folder.glob("runs/*/checkpoint.json"))

        if not self._wait("the first checkpoint", found, 0.002):
            return
        tree = [program]
        os.kill(program, signal.SIGSTOP)
        for pid in descendants(program):
            os.kill(pid, signal.SIGSTOP)
            tree.append(pid)
        (pointer,) = self.folder.glob("runs/*/checkpoint.json")
        self.first_checkpoint = json.loads(pointer.read_text())
        (self.folder / "paused").write_text(json.dumps(tree))
        self.paused.set()
        self._wait("the stop signal", lambda: sigterm_pending(program) or not alive(program), 0.01)
        for pid in reversed(tree):
            if alive(pid):
                os.kill(pid, signal.SIGCONT)


# ------------------------------------------------------------------------------------------ the server
class FakeServer:
    """The W&B server as the Agent sees it: the three GraphQL calls, answered from a plan."""

    def __init__(self, sweep_yaml: str, run: dict, folder: Path, plan: str = "stop-resume"):
        self.settings = {"entity": "test-entity", "project": "kd-fidelity"}
        self._service_api = self
        self.sweep_yaml, self.run, self.folder, self.plan = sweep_yaml, run, Path(folder), plan
        self.agent = None
        self.phase = "new"
        self.procs: list = []  # the agent's AgentProcess of each attempt
        self.seen: dict = {}  # what ran, read from /proc while the first attempt is paused
        self.pauser: Pauser | None = None
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
            if self.pauser is None:
                self.pauser = Pauser(proc._popen.pid, self.folder)
                self.pauser.start()
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
            if self.plan == "outside" or self.pauser is None or not self.pauser.paused.is_set():
                return []
            self.seen = seen_processes(proc._popen.pid)
            self.phase = "stopping"
            if self.plan == "cancel":
                return [{"type": "exit"}]  # -> Agent._command_exit -> AgentProcess.kill (SIGKILL)
            return [{"type": "stop", "run_id": RUN_ID}]  # -> Agent._command_stop -> AgentProcess.terminate
        if RUN_ID in running:
            return []
        if self.phase == "stopping":
            self.phase = "resumed"
            return [{"type": "resume", **self.run}]  # the preempted run, requeued with its run id
        self.phase = "done"
        return [{"type": "exit"}]

    def result(self) -> dict:
        return {"phase": self.phase, "problem": self.problem or (self.pauser.problem if self.pauser else ""),
                "codes": [p._popen.returncode for p in self.procs], "seen": self.seen,
                "first_checkpoint": self.pauser.first_checkpoint if self.pauser else None}


def seen_processes(launcher: int) -> dict:
    """The launcher's and the program's argv and process groups, from /proc."""
    program = program_of(launcher)
    if program is None:
        return {"launcher": cmdline(launcher)}
    return {"launcher": cmdline(launcher), "launcher_pgid": os.getpgid(launcher), "program": cmdline(program),
            "program_pid": program, "program_pgid": os.getpgid(program)}


def install(server: FakeServer) -> None:
    """Point wandb's agent at ``server``: ``wandb.Api()`` returns it; the login check passes."""
    import wandb
    from wandb.sdk import wandb_login

    wandb.Api = lambda *a, **k: server
    wandb_login._login = lambda *a, **k: True


def adopt_orphans() -> None:
    """Make this process the subreaper of its descendants (Linux). The pause is a SIGSTOP, and a stopped process
    whose process group is orphaned (its launcher killed by a cancel, itself reparented to init, in another
    session) gets SIGHUP from the kernel, which is no part of what is tested: adopted by this process, in the
    same session, the program's group is not orphaned while it is paused."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # 36 = PR_SET_CHILD_SUBREAPER


def serve(argv: list[str]) -> int:
    """``wandb ARGV`` (W&B's own command line) with the server of ``KD_FAKE_SERVER``."""
    from wandb import wandb_agent
    from wandb.cli.cli import cli

    spec = json.loads(os.environ["KD_FAKE_SERVER"])
    adopt_orphans()
    server = FakeServer(spec["sweep_yaml"], spec["run"], Path(spec["folder"]), spec["plan"])
    install(server)
    original = wandb_agent.Agent.__init__

    def init(agent, *a, **k):
        original(agent, *a, **k)
        agent.POLL_INTERVAL = 0.2
        server.agent = agent

    wandb_agent.Agent.__init__ = init
    try:
        cli.main(args=argv, prog_name="wandb", standalone_mode=False)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        if server.pauser is not None:  # a cancelled run's program is still paused: the pauser lets it go on
            server.pauser.join(timeout=120)
        out = Path(spec["folder"]) / "agent-result.json"
        out.write_text(json.dumps({**server.result(), "forward_signals": bool(server.agent
                                                                               and server.agent._forward_signals)}))
    return code


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(serve(sys.argv[1:]))
