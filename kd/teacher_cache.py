"""The exact teacher-output cache: each teacher's log-probabilities for every (image, view) pair, computed once.

Under the paper's augmentation each training image has a finite set of views (:mod:`kd.data`: 162 on CIFAR),
and a frozen teacher's output on a view never changes, so the targets a student sees are looked up instead
of recomputed: the same numbers as running the teachers (atol 1e-5), at the cost of a teacher-free step.

One file per *teacher* (its weights' sha256, the dataset and the storage dtype), shared by every ensemble
that contains it: a study's sweeps build each of its teachers' caches once (12 member passes for the
CIFAR-100 study instead of about 120 when each ensemble had its own file). An ensemble's targets are
combined on the fly from its members' files, ``log(mean_i p_i) = logsumexp_i(log p_i) - log m``, member by
member in chunks: the peak memory is one member plus the float32 accumulator. The students of one process
(a pack) share them through :class:`ResidentTeachers`: each teacher's file is read once, and students of the
same teacher set read one combined tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kd import faults
from kd.data import Data, apply_views
from kd.errors import KDError
from kd.io import CACHE_META, load_tensors, read_json, remove_stale_temps, save_tensors, write_json
from kd.models import Ensemble

FOLD_ROWS = 1 << 16  # (pair) rows of [pairs, C] combined per chunk


def cache_key(teacher_hashes: list[str], data: Data) -> str:
    """The cache key of these teachers on this dataset (a member's file: ``cache_key([its sha256], data)``)."""
    spec = data.spec
    blob = json.dumps({"teachers": teacher_hashes, "dataset": spec.name, "n": data.n_train, "pad": spec.pad,
                       "flip": spec.flip, "views": data.num_views, "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def member_path(root: Path, teacher_hash: str, data: Data, dtype: torch.dtype) -> Path:
    """The file of one teacher's log-probabilities over all views (a sibling ``.json`` records its sha256)."""
    tag = str(dtype).removeprefix("torch.")
    return Path(root) / f"teacher-targets-{cache_key([teacher_hash], data)}-{tag}.safetensors"


@torch.no_grad()
def all_view_targets(ensemble: Ensemble, data: Data, batch_size: int | None = None, autocast=None,
                     dtype: torch.dtype = torch.float32, progress: bool = True,
                     desc: str = "teacher cache") -> torch.Tensor:
    """Ensemble log-probabilities for every (training image, view): [n_train, n_views, C].

    Pairs are enumerated image-major (pair p = image p // V, view p % V), so every batch of pairs is a
    contiguous slice of the output. ``batch_size`` defaults to 4096 on accelerators and 64 on the CPU, where
    larger batches leave the cache and run slower per image (``python -m kd.bench`` times the build).
    """
    n, v = data.n_train, data.num_views
    dev = data.train_x.device
    if batch_size is None:
        batch_size = 64 if dev.type == "cpu" else 4096
    ctx = autocast or contextlib.nullcontext
    pairs = n * v
    flat = None
    bar = tqdm(total=pairs, desc=desc, unit="img", disable=not progress, mininterval=1.0)
    for s in range(0, pairs, batch_size):
        p = torch.arange(s, min(s + batch_size, pairs), device=dev)
        x = apply_views(data.train_x[p // v], p % v, data.spec).contiguous(memory_format=torch.channels_last)
        with ctx():
            lp = ensemble(x).float()
        if flat is None:
            flat = torch.empty(pairs, lp.shape[-1], dtype=dtype, device=lp.device)
        flat[s:s + len(p)] = lp
        bar.update(len(p))
        faults.point("cache-build")
    bar.close()
    return flat.view(n, v, -1)


def combine(acc: torch.Tensor, member: torch.Tensor, rows: int = FOLD_ROWS) -> torch.Tensor:
    """``acc = logaddexp(acc, member)`` in place, in chunks of ``rows`` (float32 ``acc``, any float member)."""
    a, b = acc.view(-1, acc.shape[-1]), member.view(-1, member.shape[-1])
    for s in range(0, a.shape[0], rows):
        torch.logaddexp(a[s:s + rows], b[s:s + rows].float(), out=a[s:s + rows])
    return acc


def cache_bytes(data: Data, num_classes: int, dtype: torch.dtype) -> int:
    """Size of the all-view cache: n_train x n_views x C (CIFAR-100 in float32: 50000 x 162 x 100 x 4 = 3.2 GB)."""
    return data.n_train * data.num_views * num_classes * torch.empty(0, dtype=dtype).element_size()


def free_bytes(device: torch.device) -> int | None:
    """Free memory of the device (CUDA) or available RAM (Linux CPU); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_cache_fits(data: Data, num_classes: int, dtype: torch.dtype, share: float = 0.5, members: int = 1) -> None:
    """Refuse a cache larger than ``share`` of the free memory of the device it would live on.

    An ensemble (``members`` > 1) needs its float32 accumulator and one member's (or the result's) ``dtype``
    tensor at the same time.
    """
    need = cache_bytes(data, num_classes, dtype)
    if members > 1:
        need += cache_bytes(data, num_classes, torch.float32)
    dev = data.train_x.device
    free = free_bytes(dev)
    if free is not None and need > share * free:
        smaller, what = "", ", combined from its members' files" if members > 1 else ""
        if dtype == torch.float32:
            smaller = " or --cache_dtype=float16 (half the memory, about 3 significant digits)"
        raise KDError(
            f"the teacher cache needs {need / 2**30:.1f} GiB ({data.n_train} images x {data.num_views} views x "
            f"{num_classes} classes, {dtype}{what}"
            f") but {dev} has {free / 2**30:.1f} GiB free: pass --teacher_cache=False (run the teachers every "
            f"step){smaller}"
        )


def _load(path: Path, meta_path: Path, data: Data, dtype: torch.dtype) -> torch.Tensor:
    """A member's file, verified against its recorded sha256 (refused, never rebuilt, when it does not match)."""
    shape = [data.n_train, data.num_views, data.spec.num_classes]
    meta = read_json(meta_path, CACHE_META)
    try:
        t = load_tensors(path, meta["sha256"], device=str(data.train_x.device))["log_probs"]
    except KDError as e:
        raise KDError(f"{e} (the teacher cache: delete {path} and {meta_path.name} to rebuild it, or pass "
                      "--teacher_cache=False)") from None
    if list(t.shape) != shape or t.dtype != dtype:
        raise KDError(f"the teacher cache {path} holds {t.dtype} {list(t.shape)}, expected {dtype} {shape}: "
                      f"delete it and {meta_path.name} to rebuild it")
    return t


def member_targets(member: torch.nn.Module, teacher_hash: str, data: Data, root: Path, dtype: torch.dtype,
                   autocast=None, main: bool = True, desc: str = "teacher cache") -> tuple[torch.Tensor, Path, bool]:
    """One teacher's all-view log-probabilities: its verified file, or computed (and saved by the main process)."""
    path = member_path(root, teacher_hash, data, dtype)
    meta_path = path.with_suffix(".json")
    if meta_path.exists() and path.exists():
        return _load(path, meta_path, data, dtype), path, False
    targets = all_view_targets(Ensemble([member], stacked=False), data, autocast=autocast, dtype=dtype,
                               progress=main, desc=desc)
    if main:
        meta_path.unlink(missing_ok=True)  # a stale record must never vouch for the new file
        digest = save_tensors(path, {"log_probs": targets})
        faults.point("cache-saved")  # the tensors are in place, their meta (and hash) not yet
        write_json(meta_path, {"sha256": digest, "dtype": str(dtype), "shape": list(targets.shape),
                               "teachers": [teacher_hash], "dataset": data.spec.name,
                               "key": cache_key([teacher_hash], data)})
    return targets, path, True


def cached_targets(ensemble: Ensemble, data: Data, teacher_hashes: list[str], root: Path, dtype: torch.dtype,
                   autocast=None, main: bool = True, files: dict | None = None) -> tuple[torch.Tensor, Path, bool]:
    """The ensemble's all-view targets [n, V, C] in ``dtype``, combined from its members' cache files.

    Each member's file is loaded (verified by hash) or built (atomically) by :func:`member_targets`. Returns
    (targets, the first member's file, whether any member was computed). A member file that no longer
    matches its recorded sha256 is refused (:class:`KDError`), never rebuilt silently: it was damaged or
    changed behind our back, and the user decides (delete it, or run without). A missing file is rebuilt.
    ``files`` (``{(teacher hash, dtype): tensor}``, filled here) holds the members' tensors already loaded in
    this process (:class:`ResidentTeachers`): those are read from it, never loaded again, and never changed.
    """
    members = list(ensemble.members)
    if len(members) != len(teacher_hashes):
        raise ValueError(f"{len(members)} ensemble members but {len(teacher_hashes)} teacher hashes")
    if main:
        remove_stale_temps(root)  # a cache write that was killed leaves a temp as large as the cache
    check_cache_fits(data, data.spec.num_classes, dtype, members=len(members))
    acc, first, built = None, None, False
    for i, (member, h) in enumerate(zip(members, teacher_hashes)):
        desc = f"teacher cache {i + 1}/{len(members)}" if len(members) > 1 else "teacher cache"
        if files is not None and (h, dtype) in files:
            lp, path, made = files[h, dtype], member_path(root, h, data, dtype), False
        else:
            lp, path, made = member_targets(member, h, data, root, dtype, autocast, main, desc)
            if files is not None:
                files[h, dtype] = lp
        first, built = first or path, built or made
        if len(members) == 1:
            return lp, path, made
        if acc is None:  # a float32 tensor of ours, updated in place (a resident member's tensor is copied)
            acc = lp.to(torch.float32, copy=files is not None)
        else:
            combine(acc, lp)
        del lp
    acc.sub_(math.log(len(members)))
    return (acc if dtype == torch.float32 else acc.to(dtype)), first, built



class ResidentTeachers:
    """The teacher caches of the students in one process (a pack), each held once: every teacher's file is
    loaded (verified) or built at most once, and the students that distill from the same teacher set read one
    combined tensor, computed by :func:`cached_targets` as a plain run computes it (the same numbers, bitwise).
    :meth:`release_files` then drops the teachers' own tensors that no set holds."""

    def __init__(self):
        self.files: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # (teacher hash, dtype) -> [n, V, C]
        self.sets: dict[tuple[tuple[str, ...], torch.dtype], tuple[torch.Tensor, Path]] = {}

    def targets(self, ensemble: Ensemble, data: Data, teacher_hashes: list[str], root: Path, dtype: torch.dtype,
                autocast=None, main: bool = True) -> tuple[torch.Tensor, Path, bool]:
        """(targets, the first teacher's file, whether any file was built), as :func:`cached_targets`."""
        key = (tuple(teacher_hashes), dtype)
        if key in self.sets:
            return *self.sets[key], False
        targets, path, built = cached_targets(ensemble, data, teacher_hashes, root, dtype, autocast, main,
                                              files=self.files)
        self.sets[key] = (targets, path)
        return targets, path, built

    def release_files(self) -> None:
        self.files.clear()  # a single teacher's set still holds its tensor
