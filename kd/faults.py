"""Deterministic fault injection for the kill/resume tests (off unless KD_FAULT is set; a test-only setting).

``KD_FAULT="POINT@N[:ACTION]"`` acts the N-th time the code passes ``point(POINT)``: ACTION is a signal to this
very process (KILL, the default, TERM or INT), or ENOSPC (the write at that point fails as on a full disk: an
``OSError``); e.g. ``train-step@37:KILL``, ``ckpt-write@2:KILL`` (between writing a checkpoint's tensors and its
pointer) or ``mirror-publish@1:ENOSPC`` (the store is full when the checkpoint is mirrored). Several faults may be
given, comma-separated. ``make chaos`` drives this.

A spec that is not of that form (an unknown point or action, a count that is not a whole number from 1) is
refused in one line naming it (:func:`check`, called before a run writes anything, and at the first point
passed), never ignored: a test meant to kill a run at a point must not pass because the point was misspelt.
"""

from __future__ import annotations

import errno
import os
import signal

from kd.errors import KDError

POINTS = ("cache-build", "cache-saved", "ckpt-write", "epoch-logged", "epoch-saved", "generator-step",
          "mirror-publish", "pool-saved", "publish-version", "published", "shard-saved", "sweep-claimed",
          "sweep-exited", "synthetic-batch", "tensors-write", "train-step")
ACTIONS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT, "ENOSPC": "ENOSPC"}
_HITS: dict[str, int] = {}


def _parse(spec: str) -> dict[str, tuple[int, object]]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, at, rest = item.partition("@")
        count, _, action = rest.partition(":")
        action = action.upper() or "KILL"
        if name not in POINTS or not at or not (count.isascii() and count.isdigit()) or not 1 <= int(count) <= 10**9 \
                or action not in ACTIONS:
            shown = item.encode("ascii", "backslashreplace").decode()[:80]
            raise KDError(f"KD_FAULT: {shown!r} is not POINT@N[:KILL|TERM|INT|ENOSPC] with a known point "
                          f"({', '.join(POINTS)}) and N a whole number from 1: fix it, or unset KD_FAULT (a "
                          "test-only setting)")
        out[name] = (int(count), ACTIONS[action])
    return out


try:
    _FAULTS, _ERROR = _parse(os.environ.get("KD_FAULT", "")), None
except KDError as e:
    _FAULTS, _ERROR = {}, e


def check() -> None:
    """A malformed KD_FAULT, as one line (before a run writes anything)."""
    if _ERROR is not None:
        raise KDError(str(_ERROR))


def point(name: str) -> None:
    if _ERROR is not None:
        check()
    if not _FAULTS or name not in _FAULTS:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    count, action = _FAULTS[name]
    if _HITS[name] == count:
        if action == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"KD_FAULT {name}@{count}")
        os.kill(os.getpid(), action)
