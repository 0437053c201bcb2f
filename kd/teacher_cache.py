"""The exact teacher-output cache: an eval-mode teacher's log-probabilities for every (image, view) pair.

Under the paper's augmentation each training image has a finite set of views (:mod:`kd.data`: 162 on CIFAR),
and a frozen teacher's output on a view never changes, so the targets a student sees are looked up instead
of recomputed: the same numbers as running the teachers (atol 1e-5), at the cost of a teacher-free step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kd import faults
from kd.data import Data, apply_views
from kd.errors import KDError
from kd.io import load_tensors, read_json, remove_stale_temps, save_tensors, write_json
from kd.models import Ensemble


def cache_key(teacher_hashes: list[str], data: Data) -> str:
    spec = data.spec
    blob = json.dumps({"teachers": teacher_hashes, "dataset": spec.name, "n": data.n_train, "pad": spec.pad,
                       "flip": spec.flip, "views": data.num_views, "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def all_view_targets(ensemble: Ensemble, data: Data, batch_size: int | None = None, autocast=None,
                     dtype: torch.dtype = torch.float32, progress: bool = True) -> torch.Tensor:
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
    bar = tqdm(total=pairs, desc="teacher cache", unit="img", disable=not progress, mininterval=1.0)
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


def cache_bytes(data: Data, num_classes: int, dtype: torch.dtype) -> int:
    """Size of the all-view cache: n_train x n_views x C (CIFAR-100 in float32: 50000 x 162 x 100 x 4 = 3.2 GB)."""
    return data.n_train * data.num_views * num_classes * torch.empty(0, dtype=dtype).element_size()


def _free_bytes(device: torch.device) -> int | None:
    """Free memory of the device (CUDA) or available RAM (Linux CPU); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_cache_fits(data: Data, num_classes: int, dtype: torch.dtype, share: float = 0.5) -> None:
    """Refuse a cache larger than ``share`` of the free memory of the device it would live on."""
    need = cache_bytes(data, num_classes, dtype)
    dev = data.train_x.device
    free = _free_bytes(dev)
    if free is not None and need > share * free:
        smaller = ""
        if dtype == torch.float32:
            smaller = " or --cache_dtype=float16 (half the memory, about 3 significant digits)"
        raise KDError(
            f"the teacher cache needs {need / 2**30:.1f} GiB ({data.n_train} images x {data.num_views} views x "
            f"{num_classes} classes, {dtype}) but {dev} has {free / 2**30:.1f} GiB free: pass "
            f"--teacher_cache=False (run the teachers every step){smaller}"
        )


def cached_targets(ensemble: Ensemble, data: Data, teacher_hashes: list[str], root: Path, dtype: torch.dtype,
                   autocast=None, main: bool = True) -> tuple[torch.Tensor, Path, bool]:
    """Load the cache for these teachers, dataset and dtype, or build it (atomically, verified by hash on load).

    A cache whose file no longer matches its recorded sha256 is refused (:class:`KDError`), never rebuilt
    silently: it was damaged or changed behind our back, and the user decides (delete it, or run without).
    A missing file (e.g. deleted by hand) is rebuilt.
    """
    key = cache_key(teacher_hashes, data)
    if main:
        remove_stale_temps(root)  # a cache write that was killed leaves a temp as large as the cache
    tag = str(dtype).removeprefix("torch.")
    path = Path(root) / f"teacher-targets-{key}-{tag}.safetensors"
    meta_path = path.with_suffix(".json")
    dev = data.train_x.device
    num_classes = data.spec.num_classes
    check_cache_fits(data, num_classes, dtype)
    shape = [data.n_train, data.num_views, num_classes]
    if meta_path.exists() and path.exists():
        meta = read_json(meta_path)
        try:
            t = load_tensors(path, meta["sha256"], device=str(dev))["log_probs"]
        except KDError as e:
            raise KDError(f"{e} (the teacher cache: delete {path} and {meta_path.name} to rebuild it, or pass "
                          "--teacher_cache=False)") from None
        if list(t.shape) != shape or t.dtype != dtype:
            raise KDError(f"the teacher cache {path} holds {t.dtype} {list(t.shape)}, expected {dtype} {shape}: "
                          f"delete it and {meta_path.name} to rebuild it")
        return t, path, False
    targets = all_view_targets(ensemble, data, autocast=autocast, dtype=dtype, progress=main)
    if main:
        meta_path.unlink(missing_ok=True)  # a stale record must never vouch for the new file
        digest = save_tensors(path, {"log_probs": targets})
        faults.point("cache-saved")  # the tensors are in place, their meta (and hash) not yet
        write_json(meta_path, {"sha256": digest, "dtype": str(dtype), "shape": list(targets.shape),
                               "teachers": teacher_hashes, "dataset": data.spec.name, "key": key})
    return targets, path, True
