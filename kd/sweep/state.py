"""A sweep's state file, ``state.json``, shared by every runner of one spec under an fcntl lock.

Each run of the grid is one entry: its key (``000-seed0``), config, W&B run id, status (pending, running,
finished, failed, interrupted), and while running the runner's pid, host and start time and the run's
process group. The file names the spec's sha256: a state folder of another spec is refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
from pathlib import Path

from kd.errors import KDError
from kd.sweep.spec import Spec

STATE_VERSION = 1


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class State:
    """state.json beside the runs' logs, read and written only under the fcntl lock of state.lock."""

    def __init__(self, folder: Path, spec: Spec):
        self.folder = folder
        self.spec = spec
        self.path = folder / "state.json"
        self.lock_path = folder / "state.lock"

    @contextlib.contextmanager
    def locked(self):
        from kd.io import write_json

        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                data = self._read()
                yield data
                write_json(self.path, data)
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _read(self) -> dict:
        if not self.path.exists():
            return {"version": STATE_VERSION, "sweep_id": self.spec.sweep_id, "spec_sha256": self.spec.sha,
                    "spec_path": str(self.spec.path.resolve()), "spec": self.spec.config,
                    "created_at": now(), "runs": []}
        data = self.peek()
        if data.get("spec_sha256") != self.spec.sha:
            raise KDError(f"{self.path} belongs to another spec ({data.get('spec_path')}): pass another "
                          "--state_dir, or delete that folder to start over")
        return data

    def peek(self) -> dict | None:
        """The state without the lock (dry runs, summaries; never written)."""
        if not self.path.exists():
            return None
        from kd.metadata import SWEEP_STATE, read_json

        return read_json(self.path, SWEEP_STATE)
