"""The folder of one run, whatever trains in it (teacher, student, packed student, DDPM, SN-GAN).

It holds, and this module alone decides:

* the configuration's identity (what the numbers depend on) and its ``fingerprint``;
* the resume rules (``--resume``): ``auto`` continues a checkpoint of the same identity, ``True`` requires one,
  ``False`` clears the folder's checkpoints, run id and done marker first; a checkpoint of another identity is
  refused, naming the settings that differ;
* the checkpoints, in the one format of :mod:`kd.checkpoint`;
* ``run.json``: the W&B run id, recorded before W&B first sees it, so a run killed before its first checkpoint
  continues the same W&B run; a checkpoint fetched from the run's mirror (another machine's) records its run id
  there too, so the run stays the same run here;
* ``done.json``: the marker of a finished run (written after its W&B run ended); it counts only while its run id
  is the one ``run.json`` records (and the one its artifact's manifest records);
* ``.lock``: held (``fcntl.flock``) by the one process that trains in the folder, from its first write until
  ``done.json``: a second process on the same folder waits for it (a packed grid skips the run instead) and then
  finds the run finished, or resumes its checkpoint; it never trains it too. With a ``claim``
  (:class:`kd.claims.RunClaim`), the run is also claimed in the artifact store at the same moment, so a folder of
  the same run on another machine sharing the store waits too (or is skipped); a ``.lock`` that is not a file is
  refused, and a read-only finished folder is read without writing (its lock is taken read-only).

Only the main process writes here; every process reads the checkpoint it resumes from.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from kd.checkpoint import Checkpoints
from kd.errors import AlreadyDone, KDError
from kd.flags import fingerprint
from kd.io import DONE, MANIFEST, RUN_ID, check_name_lengths, read_json, write_json
from kd.wandb_runs import exported_run_id, new_run_id

RUN_ID_FILE = "run.json"
DONE_FILE = "done.json"
LOCK_FILE = ".lock"
_HELD: dict[str, RunFolder] = {}  # the folders this process holds the lock of, by resolved path
POINTER_KEYS = ("file", "sha256", "fingerprint", "run_id", "history")  # what every checkpoint pointer holds


def recorded_run_id(folder: Path, main: bool = True) -> str:
    """The W&B run id recorded in ``folder/run.json``, else $WANDB_RUN_ID (as an agent sets it) or a new one,
    recorded there (by the main process) before W&B sees it."""
    file = Path(folder) / RUN_ID_FILE
    if file.exists() or file.is_symlink():
        return read_json(file, RUN_ID)["run_id"]
    run_id = exported_run_id() or new_run_id()
    if main:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json(file, {"run_id": run_id})
    return run_id


@dataclass(frozen=True)
class Layout:
    """Where a run folder keeps its checkpoints: ``{ckpt_dir}/{pointer}`` naming ``{stem}-*.safetensors``, and the
    keys its trainer's pointer must hold beside the folder's own."""

    ckpt_dir: str = ""
    pointer: str = "checkpoint.json"
    stem: str = "ckpt"
    required: tuple = ()


class RunFolder:
    """``path`` with its checkpoints as ``layout`` says."""

    def __init__(self, path: str | Path, identity: dict, resume: str = "auto", layout: Layout = Layout(),
                 main: bool = True, claim=None):
        """``claim``: the run's claim in the store (:class:`kd.claims.RunClaim`), taken with the lock."""
        self.path = Path(path)
        self.store_claim = claim
        self.identity = json.loads(json.dumps(identity, default=str))  # tuples -> lists, as read back from JSON
        self.fingerprint = fingerprint(identity)
        self.resume, self.main = str(resume), main
        folder = self.path / layout.ckpt_dir if layout.ckpt_dir else self.path
        self.checkpoints = Checkpoints(folder, pointer=layout.pointer, stem=layout.stem,
                                       required=POINTER_KEYS + tuple(layout.required))
        self.ckpt: dict | None = None
        self.inputs: dict = {}
        self._lock: int | None = None  # the descriptor of the held .lock
        self._seen: tuple | None = None  # what open() decided on: (finished, checkpoint pointer bytes)

    # ----------------------------------------------------------------------------------------- resume
    @property
    def finished(self) -> bool:
        """``done.json`` is there, it is this run's (:meth:`done_info`), and it was written for this identity (a
        folder named by its config, a generator's or a pool's, may be reused for another configuration)."""
        done = self.path / DONE_FILE
        if not (done.exists() or done.is_symlink()):
            return False
        info = self.done_info()  # a marker of another run (or of no run) is refused, never taken as "finished"
        return info.get("fingerprint", self.fingerprint) == self.fingerprint

    def done_info(self) -> dict:
        """``done.json``, refused unless it is this run's: its run id is the one ``run.json`` records, and the one
        the manifest of the artifact it names records (where that artifact is still in the store)."""
        done = self.path / DONE_FILE
        info = read_json(done, DONE)
        fix = "delete it to train the run again (or pass --resume=False)"
        ids = self.path / RUN_ID_FILE
        recorded = read_json(ids, RUN_ID)["run_id"] if ids.exists() or ids.is_symlink() else None
        if info["run_id"] != recorded:
            raise KDError(f"{done} names run {info['run_id']!r} but the run folder records "
                          f"{recorded if recorded else 'no run'} in {RUN_ID_FILE}: it is not this run's marker; {fix}")
        manifest = Path(info["store_path"]) / "manifest.json" if info.get("store_path") else None
        if manifest is not None and manifest.is_file():
            published = read_json(manifest, MANIFEST).get("run_id")
            if published is not None and published != recorded:
                raise KDError(f"{done} names the artifact {manifest.parent}, which run {published!r} published, not "
                              f"this run ({recorded}): it is not this run's marker; {fix}")
        return info

    # ----------------------------------------------------------------------------------------- the lock
    def claim(self, wait: bool = True, store: bool = True) -> bool:
        """Hold the folder's lock (main process; made on the folder's first write). Another process holding it:
        ``wait`` waits for it (one line says so), else returns False. Once held, the folder must be as
        :meth:`open` found it: finished meanwhile raises :class:`AlreadyDone`, a checkpoint changed meanwhile is
        refused (run the command again to resume it). ``store``: the run's claim in the store is taken too (not
        while :meth:`open` only reads the folder)."""
        if not self.main:
            return True
        fresh = False
        if self._lock is None:
            if not self._flock(wait):
                return False
            fresh = True
        if store and self.store_claim is not None and not self.store_claim.token:
            if not self.store_claim.acquire(wait):
                self.release()
                return False
            fresh = True
        if fresh and self._seen is not None and self._state() != self._seen:
            self.release()
            if self.finished:
                raise AlreadyDone(f"already finished (by another process meanwhile): {self.path}")
            done = (self.store_claim.replaced or {}) if self.store_claim is not None else {}
            if done.get("state") == "finished":
                raise AlreadyDone(f"already finished meanwhile by pid {done['pid']} on {done['host']} (run folder "
                                  f"{done.get('run_folder')}): {self.path}")
            raise KDError(f"another process trained {self.path.name} while this one prepared: run the same command "
                          "again to resume its checkpoint")
        return True

    def _flock(self, wait: bool) -> bool:
        key = str(self.path.resolve())
        holder = _HELD.get(key)
        if holder is not None:  # an earlier object of this same process (one it gave up on): the lock passes on
            fd, holder._lock = holder._lock, None
        else:
            fd = self._open_lock()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    return False
                print(f"waiting: another process is training {self.path}", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock, _HELD[key] = fd, self
        return True

    def _open_lock(self) -> int:
        """The descriptor of ``.lock`` (made if missing); read-only where the folder cannot be written (flock needs
        no write access: a finished run in a read-only folder is read, never written)."""
        lock = self.path / LOCK_FILE
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            return os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except IsADirectoryError:
            raise KDError(f"{lock} is a folder, not the run folder's lock file: remove it and run again") from None
        except OSError as e:
            try:
                return os.open(lock, os.O_RDONLY)
            except OSError:
                raise KDError(f"cannot make the lock file {lock} ({e.strerror or type(e).__name__}): the run folder "
                              "must be writable by this user; pass another --out_dir") from None

    def release(self, finished: bool = False) -> None:
        """Drop the lock and the run's claim in the store (``finished``: kept there as the finished run's record)."""
        if self.store_claim is not None:
            self.store_claim.release(finished)
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the flock
            self._lock = None
            _HELD.pop(str(self.path.resolve()), None)

    def _state(self) -> tuple:
        done = self.path / DONE_FILE
        pointer = self.checkpoints.pointer
        mirrored = self.store_claim.mirror_state() if self.store_claim is not None else None
        return done.exists(), pointer.read_bytes() if pointer.is_file() else None, mirrored

    def open(self) -> dict | None:
        """Apply the resume rules; returns the checkpoint to continue from (verified), or None.

        A folder whose lock exists is locked first when the lock is free (waited for with --resume=False, which
        clears the folder); otherwise the folder is read as it stands and locked at the first write
        (:meth:`run_id`), where a change since is noticed. Reading writes nothing."""
        check_name_lengths(self.path, "the run folder")
        lock = self.path / LOCK_FILE
        if lock.is_symlink() or (lock.exists() and not lock.is_file()):
            raise KDError(f"{lock} is not a file (a folder or a link): the run folder's lock must be a plain file; "
                          "remove it and run again")
        if self.main and lock.is_file():
            self.claim(wait=self.resume == "False", store=self.resume == "False")
        ckpt = self._open()
        self._seen = self._state()
        if self._seen[0] and self.resume == "auto":
            self.release()  # finished: nothing will be written, and no other process need wait for it
        return ckpt

    def _open(self) -> dict | None:
        if self.main:
            self.checkpoints.clean()  # temps of writes that were killed: never read, only space
        if self.resume == "False":
            if self.main:
                self.checkpoints.clear()
                for name in (DONE_FILE, RUN_ID_FILE):
                    (self.path / name).unlink(missing_ok=True)
            return None
        if self.finished and self.resume == "auto":
            return None  # the caller reports the finished run; its last checkpoint is not needed
        fix = f"pass --resume=False to train this run from scratch (or restore the file); run folder {self.path}"
        ckpt = self.checkpoints.load(fix)
        if ckpt is not None and ckpt["fingerprint"] != self.fingerprint:
            before = ckpt.get("identity") or {}
            diff = sorted(k for k in {**before, **self.identity} if before.get(k) != self.identity.get(k))
            what = f" (differs in {', '.join(diff)})" if before and diff else ""
            raise KDError(f"the checkpoint in {self.checkpoints.folder} belongs to another configuration{what}: "
                          f"remove {self.path}, or pass --resume=False to start over")
        if ckpt is None and self.resume == "True":
            raise KDError(f"--resume=True but there is no checkpoint in {self.checkpoints.folder}: run without "
                          "--resume to start (the default --resume=auto continues a checkpoint when one exists)")
        self.ckpt = ckpt
        return ckpt

    def check_inputs(self, inputs: dict) -> None:
        """A resumed run must see the inputs it was checkpointed with (e.g. the teachers' and the pool's sha256):
        a teacher republished between a stop and the rerun would switch the targets mid-run."""
        self.inputs = inputs
        before = (self.ckpt or {}).get("inputs")
        if before is not None and before != inputs:
            changed = ", ".join(sorted(k for k in {**before, **inputs} if before.get(k) != inputs.get(k)))
            raise KDError(f"the inputs of {self.path} changed since its checkpoint ({changed}: a teacher or pool "
                          "was republished?): restore them, or pass --resume=False to start over")

    # ----------------------------------------------------------------------------------------- run id
    def run_id(self) -> str:
        """The checkpoint's W&B run id, else the one this folder already started W&B with, else $WANDB_RUN_ID (as
        an agent sets it) or a new one; recorded in ``run.json`` before W&B sees it."""
        if not self.ckpt:
            self._check_exported_run_id()
        self.claim()  # the first write to the folder: from here on no other process trains in it
        if not self.ckpt:
            return recorded_run_id(self.path, self.main)
        self.record_run_id(self.ckpt["run_id"])
        return self.ckpt["run_id"]

    def record_run_id(self, run_id: str) -> None:
        """``run.json`` names ``run_id`` (main process): the run of a checkpoint this folder resumes (one fetched
        from the run's mirror included), so ``done.json`` later names the run ``run.json`` records."""
        file = self.path / RUN_ID_FILE
        if not self.main:
            return
        if (file.exists() or file.is_symlink()) and read_json(file, RUN_ID)["run_id"] == run_id:
            return
        write_json(file, {"run_id": run_id})

    def _check_exported_run_id(self) -> None:
        """An exported $WANDB_RUN_ID that another run folder beside this one already records is refused before
        anything is written: a run id names one run (otherwise this run would merge into that one's W&B run)."""
        exported = exported_run_id()
        if not exported or (self.path / RUN_ID_FILE).exists():
            return
        for other in sorted(self.path.parent.glob(f"*/{RUN_ID_FILE}")):
            if other.parent == self.path:
                continue
            try:
                theirs = read_json(other, RUN_ID)["run_id"]
            except KDError:
                continue  # that folder's own problem, reported when it runs
            if theirs == exported:
                raise KDError(f"WANDB_RUN_ID={exported} is the W&B run of another run folder, {other.parent}: a run "
                              "id names one run; unset WANDB_RUN_ID to start this run under its own id")

    # ----------------------------------------------------------------------------------------- writes
    def save(self, tensors: dict, info: dict, run_id: str, name: str | None = None) -> dict:
        """A checkpoint (main process only): tensors plus ``info``, with the identity, run id and inputs."""
        self.ckpt = self.checkpoints.save(tensors, {
            **info, "fingerprint": self.fingerprint, "identity": self.identity, "run_id": run_id,
            "inputs": self.inputs}, name=name)
        return self.ckpt

    def tensors(self, device: str = "cpu") -> dict:
        return self.checkpoints.tensors(device)

    def mark_done(self, info: dict) -> None:
        if self.main:
            write_json(self.path / DONE_FILE, {**info, "fingerprint": self.fingerprint})
            self.release(finished=True)
