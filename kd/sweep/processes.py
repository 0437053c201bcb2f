"""Processes of a sweep's runs: is a pid still the process it was, is a process group empty, stop a group.

Plain Python (no torch): the launcher (kd.sweep.launch) imports this on every run's start. On Linux the
answers come from /proc (a pid's start time tells a reused pid from the old process; a zombie counts as
gone); elsewhere from ``kill(pid, 0)``.
"""

from __future__ import annotations

import contextlib
import os
import signal
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
