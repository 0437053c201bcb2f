"""Processes of a sweep's runs: is a pid still the process it was, is a process group empty, stop a group, and
the watcher that stops a run whose launcher was killed.

Plain Python (no torch): the launcher (kd.sweep.launch) imports this on every run's start. On Linux the
answers come from /proc (a pid's start time tells a reused pid from the old process; a zombie counts as
gone); elsewhere from ``kill(pid, 0)``.

The watcher (:func:`start_watch`) is a fork of the launcher in a session of its own, joined to it by a pipe.
The launcher tells it the run's process group, whether a stop was passed on, and that the group ended. When
the pipe closes without that last word (the launcher was SIGKILLed: ``wandb sweep --cancel``, or the agent's
kill 30 s after a stop), the watcher stops the group itself: SIGTERM (the programs checkpoint and exit),
then SIGKILL once ``TERM_GRACE_S`` has passed since the first stop signal. So a run outlives its launcher
just long enough to save its checkpoint, and no process of it runs on unwatched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from kd.errors import KDError

TERM_GRACE_S = 60.0  # a stopped run's program gets this long to write its checkpoint
_PROC = Path("/proc")


def _has_proc() -> bool:
    return (_PROC / "self" / "stat").exists()


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, process group, start time in clock ticks) from /proc; None if there is no such pid."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    return rest[0], int(rest[2]), int(rest[19])


def process_start(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot) where /proc tells it, else None."""
    info = _proc_stat(pid) if _has_proc() else None
    return info[2] if info else None


def pid_alive(pid: int, start: int | None) -> bool:
    """Whether ``pid`` still runs and is the same process (its start time matches; a zombie is dead)."""
    if _has_proc():
        info = _proc_stat(pid)
        if info is None or info[0] in ("Z", "X"):
            return False
        return start is None or info[2] == start
    from kd.io import pid_exists  # kd.io imports torch: only where there is no /proc

    return pid_exists(pid)


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process remains in the process group ``pgid``."""
    if _has_proc():
        for entry in _PROC.iterdir():
            if entry.name.isdigit():
                info = _proc_stat(int(entry.name))
                if info and info[1] == pgid and info[0] not in ("Z", "X"):
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_group(pgid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the process group ``pgid`` to empty; whether it did."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group ended between a check and the signal
        os.killpg(pgid, signum)


def stop_group(pgid: int, grace: float = TERM_GRACE_S) -> None:
    """SIGTERM a run's process group (the programs checkpoint on it), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if not group_alive(pgid):
            return
        signal_group(pgid, sig)
        if wait_group(pgid, wait):
            return
    raise KDError(f"process group {pgid} of a cut-off run survives SIGKILL: stop it by hand, then rerun")


# -- the watcher
WATCH_IGNORES = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def start_watch(grace: float = TERM_GRACE_S) -> int:
    """Fork the watcher; the write end of its pipe (close-on-exec: the launcher alone holds it)."""
    read, write = os.pipe()
    if os.fork() == 0:  # the watcher
        code = 0
        try:
            os.close(write)
            os.setsid()  # signals to the launcher's process group (a runner's stop) do not reach it
            for s in WATCH_IGNORES:  # nor a scheduler's SIGTERM to every process: the launcher's death is its cue
                signal.signal(s, signal.SIG_IGN)
            watch(read, grace)
        except BaseException:  # a forked child never returns into the launcher's code
            code = 1
        finally:
            os._exit(code)
    os.close(read)
    return write


def tell(fd: int, word: str) -> None:
    """One message to the watcher: ``group PGID``, ``stop``, ``done`` (a pipe write under 512 bytes is atomic)."""
    with contextlib.suppress(OSError):  # no watcher (it failed): the launcher goes on
        os.write(fd, f"{word}\n".encode())


def _messages(fd: int):
    """(word, argument, time received) of each message, until the pipe closes."""
    pending = b""
    while chunk := os.read(fd, 512):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            word, _, arg = line.decode().partition(" ")
            yield word, arg, time.monotonic()


def watch(fd: int, grace: float) -> None:
    pgid, stopped, done = None, None, False
    for word, arg, at in _messages(fd):
        if word == "group":
            pgid, done = int(arg), False
        elif word == "stop" and stopped is None:
            stopped = at
        elif word == "done":
            done = True
    if done or pgid is None or not group_alive(pgid):
        return
    if stopped is None:
        print(f"kd.sweep.launch: the launcher was killed: SIGTERM to the run's process group {pgid} (it "
              f"checkpoints, then exits; SIGKILL in {grace:.0f} s)", file=sys.stderr, flush=True)
        signal_group(pgid, signal.SIGTERM)
        stopped = time.monotonic()
    if wait_group(pgid, stopped + grace - time.monotonic()):
        return
    print(f"kd.sweep.launch: the run's process group {pgid} still runs {grace:.0f} s after its stop: SIGKILL",
          file=sys.stderr, flush=True)
    signal_group(pgid, signal.SIGKILL)
    wait_group(pgid, 10.0)
