"""A run's claim in the artifact store: one process trains a run, even across machines that share the store.

The run folder's ``.lock`` (:mod:`kd.run_folder`) covers one folder on one machine. A run requeued onto another
machine has another folder of the same name there, and both resume from the same mirrored checkpoint
(:mod:`kd.mirror`). So a run is also claimed in the store, beside its mirrored checkpoint:
``{store}/checkpoint-{run folder}/claim.json``, naming the holder's host, pid (and its start time), its SLURM job,
its run folder, when it started, and its heartbeat. :class:`RunClaim`:

* ``acquire``: made with ``link(2)`` of a complete file (atomic, also on NFS: of two processes, one gets it); a
  claim held by a live process waits (one line says who holds it) or, for a packed grid, is skipped;
* a claim is *stale*, and is taken over, only when its holder cannot be training any more: a pid of this host that
  is gone (or is another process now), an earlier start of this same SLURM job (SLURM starts a requeued job again
  only once the last start ended), or a heartbeat older than ``KD_CLAIM_STALE_S`` seconds (default 600; the
  heartbeat is refreshed every ``stale / 10`` seconds by a thread of the holder, and at every checkpoint). A
  takeover moves the stale claim aside with ``rename(2)`` and checks that it moved the claim it judged;
* ``refresh`` (every checkpoint): a holder whose claim was taken over meanwhile (its heartbeat stopped for longer
  than the limit: a frozen process) stops with one line before it mirrors anything, so its checkpoint never
  replaces the new holder's; its local checkpoint stays;
* ``release``: removed when the run stops or fails; at the end of a finished run it is kept as a ``finished``
  record, so a process that waited for it says "already finished" instead of training the run again.

What this guarantees on a shared file system: creation and takeover rely on ``link`` and ``rename`` being atomic
(local file systems, NFS, Lustre, GPFS); the heartbeat rule compares the holder's clock with the reader's, so the
hosts' clocks must agree to well within ``KD_CLAIM_STALE_S``. A claim is never taken from a live holder on this
host; a holder elsewhere loses it only after its heartbeat stopped for ``KD_CLAIM_STALE_S``, and then stops at its
next checkpoint. So two processes never both train a run past one checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

from kd import artifacts
from kd.errors import KDError
from kd.flags import env_seconds
from kd.io import owner_tag, write_json
from kd.metadata import MANIFEST, Shape, Within, read_json

CLAIM_FILE = "claim.json"
STALE_S = 600.0
POLL_S = 2.0
CLAIM = Shape("a run's claim (state, host, pid, heartbeat)",
              {"state": str, "host": str, "pid": Within(int, 0, 2**32), "heartbeat": Within((float, int), 0, 1e11),
               "token": str},
              {"pid_start": (int, type(None)), "started": (float, int), "run_folder": str, "slurm": (dict, type(None))},
              fix="delete it if no process trains that run (the run then resumes from its mirrored checkpoint)")


def stale_after() -> float:
    """KD_CLAIM_STALE_S: seconds without a heartbeat after which a claim of another host is taken over."""
    return env_seconds("KD_CLAIM_STALE_S", STALE_S, 10, 7 * 86400,
                       "how long a run's claim in the store may go without a heartbeat")


def _pid_start(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2:].split()[19])


def _alive(pid: int, start: int | None) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: the pid alone
        from kd.io import pid_exists

        return pid_exists(pid)
    rest = raw[raw.rindex(")") + 2:].split()
    return rest[0] not in ("Z", "X") and (start is None or int(rest[19]) == start)


def _slurm() -> dict | None:
    job = os.environ.get("SLURM_JOB_ID", "")
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return {"job": job, "restart": int(restart) if restart.isdigit() else 0} if job else None


def describe(claim: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(claim.get("started", claim["heartbeat"])))
    return f"pid {claim['pid']} on {claim['host']} (since {since}, run folder {claim.get('run_folder', '?')})"


class RunClaim:
    """The claim of the run in ``run_dir`` (named by the folder's name) in the store ``store``."""

    def __init__(self, run_dir: Path, store=None):
        self.run_dir, self.store = Path(run_dir), store
        self.folder = artifacts.store_root(store) / f"checkpoint-{self.run_dir.name}"
        self.path = self.folder / CLAIM_FILE
        self.stale_s = stale_after()
        self.token = ""  # set while held
        self.started = 0.0
        self.lock = threading.Lock()  # between this thread and the heartbeat thread
        self.replaced: dict | None = None  # the claim this one replaced (a finished one: the run is done)
        self.lost: dict | None = None  # the claim that replaced this one

    # ------------------------------------------------------------------------------------------- reading
    def read(self) -> dict | None:
        if not self.path.exists() and not self.path.is_symlink():
            return None
        return read_json(self.path, CLAIM)

    def mirror_state(self) -> tuple | None:
        """Which mirrored checkpoint the store holds for this run now (version and position), None if none."""
        try:
            version = artifacts.local_versions(self.folder.name, self.store)
            if version is None:
                return None
            if not (version / "manifest.json").is_file():
                return (version.name, "absent")
            meta = read_json(version / "manifest.json", MANIFEST).get("metadata") or {}
        except KDError as e:
            return ("unreadable", str(e))
        return version.name, meta.get("run_id"), meta.get("epoch"), meta.get("step")

    def _mine(self, claim: dict) -> bool:
        same_process = claim["host"] == socket.gethostname() and claim["pid"] == os.getpid()
        return claim["token"] == self.token or same_process

    def stale(self, claim: dict) -> bool:
        """Whether the holder of ``claim`` cannot be training any more (module docstring)."""
        if claim["host"] == socket.gethostname():
            return not _alive(claim["pid"], claim.get("pid_start"))
        mine, theirs = _slurm(), claim.get("slurm")
        if mine and theirs and theirs.get("job") == mine["job"] and theirs.get("restart", 0) < mine["restart"]:
            return True
        return time.time() - claim["heartbeat"] > self.stale_s

    # ------------------------------------------------------------------------------------------- holding
    def acquire(self, wait: bool = True) -> bool:
        """Hold the claim (module docstring); False when another live process holds it and ``wait`` is False."""
        announced = False
        while True:
            held = self.read()
            if held is None or held["state"] != "held" or self._mine(held) or self.stale(held):
                if self._take(held):
                    self.replaced = held
                    _HEARTBEATS.add(self)
                    return True
                continue
            if not wait:
                return False
            if not announced:
                print(f"waiting: {describe(held)} holds this run (its claim: {self.path})", file=sys.stderr,
                      flush=True)
                announced = True
            time.sleep(POLL_S)

    def _record(self, state: str = "held") -> dict:
        now = time.time()
        return {"state": state, "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                "started": self.started or now, "heartbeat": now, "run_folder": str(self.run_dir.resolve()),
                "slurm": _slurm(), "token": self.token}

    def _take(self, held: dict | None) -> bool:
        """Put this process's claim in place of ``held`` (None: no claim there); False if another process was
        faster."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if held is not None:
            aside = self.folder / f".{CLAIM_FILE}.{owner_tag()}.{secrets.token_hex(4)}.old"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            moved = read_json(aside, CLAIM)
            if moved["token"] != held["token"]:  # another process replaced it meanwhile: put theirs back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                aside.unlink(missing_ok=True)
                return False
            aside.unlink(missing_ok=True)
        self.token, self.started = secrets.token_hex(8), time.time()
        tmp = self.folder / f".{CLAIM_FILE}.{owner_tag()}.{self.token}.tmp"
        write_json(tmp, self._record())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            self.token = ""
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def refresh(self) -> None:
        """The heartbeat; a claim taken over meanwhile stops this run (module docstring)."""
        with self.lock:
            if not self.token:
                return
            held = self.read()
            if held is not None and held["token"] == self.token:
                write_json(self.path, self._record())
                return
            self.lost, self.token = held, ""
        _HEARTBEATS.discard(self)
        who = describe(held) if held else "nobody (its claim was deleted)"
        raise KDError(f"this run was taken over by {who} while this process did not refresh its claim for "
                      f"{self.stale_s:.0f} s (KD_CLAIM_STALE_S): this process stops; its last checkpoint stays "
                      f"in {self.run_dir}")

    def beat(self) -> None:
        """The heartbeat thread's refresh: only while the claim is still this process's."""
        with self.lock, contextlib.suppress(KDError, OSError):  # a lost claim is noticed at the next checkpoint
            if self.token and (self.read() or {}).get("token") == self.token:
                write_json(self.path, self._record())

    def release(self, finished: bool = False) -> None:
        """Give the claim up: removed, or at a finished run's end kept as its ``finished`` record."""
        _HEARTBEATS.discard(self)
        with self.lock:
            self._release(finished)

    def _release(self, finished: bool) -> None:
        if not self.token:
            return
        try:
            held = self.read()
            if held is not None and held["token"] == self.token:
                if finished:
                    write_json(self.path, self._record("finished"))
                else:
                    self.path.unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        self.folder.rmdir()  # only if empty: a run that never mirrored a checkpoint
        except (KDError, OSError) as e:
            print(f"warning: could not release this run's claim {self.path} ({e}); another process takes it over "
                  "once it is stale", file=sys.stderr, flush=True)
        finally:
            self.token = ""


class _Heartbeats:
    """One daemon thread of this process refreshing every claim it holds, every tenth of the stale limit."""

    def __init__(self):
        self.held: set[RunClaim] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, claim: RunClaim) -> None:
        with self.lock:
            self.held.add(claim)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._beat, name="kd-claim-heartbeat", daemon=True)
                self.thread.start()

    def discard(self, claim: RunClaim) -> None:
        with self.lock:
            self.held.discard(claim)

    def _beat(self) -> None:
        while True:
            with self.lock:
                held = list(self.held)
            if not held:
                with self.lock:
                    if not self.held:
                        self.thread = None
                        return
                continue
            time.sleep(min(c.stale_s for c in held) / 10)
            for claim in held:
                claim.beat()


_HEARTBEATS = _Heartbeats()
