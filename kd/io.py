"""Files that are never half-written and never trusted blindly.

Every file this repository writes goes through :func:`atomic_write` (temp file in the same folder, fsync,
``os.replace``). Weights are safetensors (no pickle) with a JSON of metadata beside them that records the
sha256 of the weights; :func:`load_weights` refuses a file whose hash does not match.
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kd import faults
from kd.errors import KDError


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


@dataclass(frozen=True)
class Shape:
    """What a metadata file must hold: a JSON object with ``required`` keys (and ``optional`` ones when present) of
    the given types; ``what`` names it in the one-line refusal, ``fix`` says what to do about a wrong one."""

    what: str
    required: dict = field(default_factory=dict)
    optional: dict = field(default_factory=dict)
    fix: str = "delete it and rerun"


_NONE = type(None)
OBJECT = Shape("a JSON object")
POINTER = Shape('a store pointer {"version": "vN"}', {"version": str},
                fix="publish the artifact again, or delete the file")
MANIFEST = Shape("an artifact manifest (name, type, version, files)",
                 {"name": str, "type": str, "version": str, "files": dict},
                 {"metadata": dict, "aliases": list, "run_id": (str, _NONE)},
                 fix="delete its version folder and publish it again")
WEIGHTS_META = Shape("weights metadata (sha256, file, arch, dataset, num_classes)", {"sha256": str},
                     {"file": str, "arch": str, "dataset": str, "num_classes": int},
                     fix="publish the weights again")
RUN_ID = Shape('a run id {"run_id": "..."}', {"run_id": str}, fix="delete it (or pass --resume=False)")
DONE = Shape("a finished run's marker (run_id, summary)", {"run_id": str},
             {"summary": dict, "artifact": str, "store_path": str, "wandb": str, "fingerprint": str},
             fix="delete it to train the run (or pass --resume=False)")
POOL = Shape("pool metadata (sha256, count, dataset)", {"sha256": str},
             {"count": int, "dataset": str, "num_classes": int, "model": str, "fid": (float, int, _NONE)},
             fix="generate the pool again with `python -m kd.synthetic generate`")
GENERATOR = Shape("generator metadata (kind, preset, file, sha256)", {},
                  {"kind": str, "preset": dict, "sha256": str, "file": str},
                  fix="train or publish the generator again")
REPORT_CACHE = Shape("the report's cache (version, entries or runs)", {},
                     {"version": int, "entries": dict, "runs": list, "fingerprint": list},
                     fix="delete it (the report then reads every run again)")

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
               list: "a list", _NONE: "null"}


def _json_kind(value) -> str:
    for t in (bool, int, float, str, list, dict, _NONE):
        if isinstance(value, t):
            return _TYPE_NAMES[t]
    return type(value).__name__


def _fits(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:  # JSON true is not a count
        return False
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def read_json(path: str | Path, shape: Shape = OBJECT) -> dict:
    """The JSON object in ``path``, checked against ``shape``; anything else (missing, a folder, binary bytes,
    cut-off JSON, a list or number, a key of the wrong type) is one KDError naming the file and what it should
    hold."""
    path = Path(path)
    should = f"it should hold {shape.what}: {shape.fix}"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KDError(f"missing file {path}") from None
    except IsADirectoryError:
        raise KDError(f"{path} is a folder, not a file: {should}") from None
    except OSError as e:
        raise KDError(f"cannot read {path} ({e.strerror or type(e).__name__}): {should}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise KDError(f"{path} is not JSON text (binary bytes): {should}") from None
    except json.JSONDecodeError as e:
        raise KDError(f"corrupt JSON in {path} ({e.msg} at line {e.lineno}): {should}") from None
    if not isinstance(data, dict):
        raise KDError(f"{path} holds {_json_kind(data)}, not a JSON object: {should}")
    for key, types in (*shape.required.items(), *shape.optional.items()):
        if key not in data:
            if key in shape.required:
                raise KDError(f"{path} has no {key!r}: {should}")
            continue
        if not _fits(data[key], types):
            want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in (types if isinstance(types, tuple) else
                                                                          (types,)))
            raise KDError(f"{path}: {key!r} is {_json_kind(data[key])}, not {want}: {should}")
    return data


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


def load_tensors(path: str | Path, sha256: str | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, verifying its sha256 first when one is given."""
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
        return load_file(str(path), device=device)
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
