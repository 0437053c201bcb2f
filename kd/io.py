"""Files that are never half-written and never trusted blindly.

Every file this repository writes goes through :func:`atomic_write` (temp file in the same folder, fsync,
``os.replace``). Weights are safetensors (no pickle) with a JSON of metadata beside them that records the
sha256 of the weights; :func:`load_weights` refuses a file whose hash does not match. Every JSON file is read by
:func:`kd.metadata.read_json` (re-exported here), within bounds and against the shape of its kind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kd import faults
from kd.errors import KDError
from kd.metadata import (  # noqa: F401  (the metadata reader and its shapes, re-exported where they were)
    CACHE_META,
    DONE,
    GENERATOR,
    MANIFEST,
    OBJECT,
    POINTER,
    POOL,
    REPORT_CACHE,
    RUN_ID,
    SHARD_INDEX,
    SWEEP_STATE,
    WEIGHTS_META,
    Each,
    Shape,
    Within,
    read_json,
)


def owner_tag() -> str:
    """``HOSTHASH-PID``: written into every temp name, so a stale temp (its writer was killed) is known as such."""
    return f"{hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]}-{os.getpid()}"


_OWNED = re.compile(r"(?:^\.incoming-|\.)([0-9a-f]{8})-(\d+)[.-]")


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files and staging folders in ``folder`` whose writer, a process of this host, is gone.

    A SIGKILL in the middle of a write leaves its temp behind (never read: only the rename makes a file
    visible); without this, every kill would leak one (a CIFAR-100 teacher cache: 3 GB). Temps of live
    processes, of other hosts (a shared store) and of unknown origin are left alone.
    """
    folder, host, removed = Path(folder), owner_tag().split("-")[0], []
    if not folder.is_dir():
        return removed
    for p in folder.glob(".*"):
        m = _OWNED.search(p.name)
        if not m or m.group(1) != host or not (p.name.endswith(".tmp") or p.name.startswith(".incoming-")):
            continue
        if pid_exists(int(m.group(2))):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process cleaned it up first
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        removed.append(p)
    return removed


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@contextlib.contextmanager
def temp_beside(path: Path):
    """A temp file name beside ``path`` (mode as the process's umask allows, not mkstemp's 0600); on success
    it is fsynced and renamed over ``path``, on any failure removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # after the write: a writer may have made the file anew
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb"):
    """Open a temp file beside ``path``; on success fsync and rename over ``path``, else remove it."""
    with temp_beside(Path(path)) as tmp, open(tmp, mode) as fh:
        yield fh


def write_json(path: str | Path, obj) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """Atomically write a safetensors file; returns its sha256."""
    with temp_beside(Path(path)) as tmp:
        clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(clean, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        faults.point("tensors-write")  # the file is complete but not yet in place
        digest = sha256_file(tmp)
    return digest


def tensor_device(device) -> str:
    """``device`` as safetensors takes it: every CPU device (Accelerate's ``cpu:0`` of each process of a
    several-process CPU run included) is ``cpu``."""
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else str(device)


def load_tensors(path: str | Path, sha256: str | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (onto ``device``: a name or a torch.device), verifying its sha256 first when one
    is given."""
    path = Path(path)
    if not path.exists():
        raise KDError(f"missing file {path}")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise KDError(
                f"{path} is corrupt or was changed: sha256 {actual[:12]}... does not match the recorded "
                f"{sha256[:12]}...; delete it and recreate it"
            )
    try:
        return load_file(str(path), device=tensor_device(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise KDError(f"{path} is not a readable safetensors file ({e}); delete it and recreate it") from None


def save_weights(folder: str | Path, state: dict[str, torch.Tensor], meta: dict) -> dict:
    """``folder/model.safetensors`` + ``folder/meta.json`` (meta gains ``sha256`` and ``file``)."""
    folder = Path(folder)
    digest = save_tensors(folder / "model.safetensors", state)
    meta = {**meta, "sha256": digest, "file": "model.safetensors"}
    write_json(folder / "meta.json", meta)
    return meta


def load_weights(folder: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    meta = read_json(folder / "meta.json", WEIGHTS_META)
    return load_tensors(folder / plain_file_name(meta.get("file", "model.safetensors"), folder / "meta.json"),
                        meta["sha256"], device), meta


def plain_file_name(name: str, where: Path) -> str:
    """A file name that ``where`` records for a file beside it: one plain name, never a path out of its folder."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise KDError(f"{where} names the file {name!r}, which is not a plain file name beside it: "
                      "publish it again")
    return name


PATH_ROOM = 512  # bytes a run adds below a folder it is given (run folder, artifact and file names)


def check_name_lengths(path: str | Path, what: str, near: Path | None = None) -> None:
    """No component of ``path`` is longer than the file system (that of ``near``, its nearest existing folder)
    allows: refused before anything is made, instead of failing halfway."""
    path = Path(path).absolute()
    if near is None:
        near = path
        while not os.path.exists(near):  # (os.path.exists: False, not an error, for a name over the limit)
            near = near.parent
    try:
        limit = os.pathconf(near, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise KDError(f"{what} {str(path)[:80]}...: the name {part[:24]}... is {len(os.fsencode(part))} bytes, "
                          f"over the file system's limit of {limit}: pass a shorter path")
    try:
        total = os.pathconf(near, "PC_PATH_MAX")
    except (OSError, ValueError):
        total = 4096
    if len(os.fsencode(str(path))) + PATH_ROOM > total:
        raise KDError(f"{what} {str(path)[:80]}... is {len(os.fsencode(str(path)))} bytes long; with the names the "
                      f"run writes inside it, that is over the file system's limit of {total} for a whole path: pass a "
                      "shorter path")


def check_folder(path: str | Path, what: str, need_bytes: int = 0) -> None:
    """``path`` is, or can be made as, a writable folder with ``need_bytes`` free: checked before any work, and
    without writing anything (the nearest existing ancestor is tested)."""
    path = Path(path).absolute()
    check_name_lengths(path, what)
    near = path
    while not os.path.exists(near):  # (False, not an error, for a name over the limit)
        near = near.parent
    if not near.is_dir():
        raise KDError(f"{what} {path} cannot be a folder: {near} is a file; pass another folder or remove it")
    if not os.access(near, os.W_OK | os.X_OK):
        raise KDError(f"{what} {path} is not writable ({near} is read-only for this user): pass another folder")
    if need_bytes:
        free = shutil.disk_usage(near).free
        if free < need_bytes:
            raise KDError(f"{what} {path} has {free / 2**20:.0f} MiB free but the run needs at least "
                          f"{need_bytes / 2**20:.0f} MiB there: free some space or pass another folder")
