"""Deterministic fault injection for the kill/resume tests (off unless KD_FAULT is set).

``KD_FAULT="POINT@N:SIG"`` sends SIG (KILL, TERM or INT) to this very process the N-th time the code passes
``point(POINT)``; e.g. ``train-step@37:KILL`` or ``ckpt-write@2:KILL`` (between writing a checkpoint's
tensors and its pointer). Several faults may be given, comma-separated. ``make chaos`` drives this.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("KD_FAULT", "")
_HITS: dict[str, int] = {}


def _parse(spec: str) -> dict[str, tuple[int, int]]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition("@")
        count, _, sig = rest.partition(":")
        out[name] = (int(count), {"TERM": signal.SIGTERM, "INT": signal.SIGINT}.get(sig.upper(), signal.SIGKILL))
    return out


_FAULTS = _parse(_SPEC)


def point(name: str) -> None:
    if not _FAULTS or name not in _FAULTS:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    count, sig = _FAULTS[name]
    if _HITS[name] == count:
        os.kill(os.getpid(), sig)
