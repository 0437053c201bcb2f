"""Reading a pool of synthetic images: what distillation needs of the synthetic stage (which writes pools).

A pool is ``pool.safetensors`` (key ``images``: uint8 [N, 3, H, W] at the dataset's resolution) with
``pool.json`` beside it (metadata, its sha256, FID), published as artifact ``synthetic-{dataset}-{source}``.
:func:`pool_file` finds the file of a reference (a file, its folder, or an artifact name: resolved in the
local store, or online downloaded through the run, so W&B records the lineage); :func:`load_pool` reads and
verifies it. ``python -m kd.synthetic generate`` (:mod:`kd.synthetic.pool`) writes pools.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd.artifacts import resolve
from kd.errors import NAME_RE, KDError
from kd.io import POOL, load_tensors, read_json

POOL_FILE = "pool.safetensors"
MAKE_ONE = "`python -m kd.synthetic generate --dataset=... --model=...`"


def is_artifact_name(ref: str) -> bool:
    return bool(NAME_RE.match(ref)) and ".." not in ref and not ref.endswith(".safetensors")


def pool_file(ref: str, store=None, run=None) -> Path:
    """The pool file a reference names (an artifact is resolved, online downloaded)."""
    ref = str(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        return path / POOL_FILE
    if path.is_file() or path.suffix == ".safetensors":
        return path
    if is_artifact_name(ref):
        hint = f": create it with {MAKE_ONE}, or pass a pool file or folder"
        return resolve(ref, run=run, store=store, kind="synthetic pool", hint=hint,
                       needs=(POOL_FILE, "pool.json")) / POOL_FILE
    raise KDError(f"synthetic pool {ref!r} not found: pass a pool file, its folder or a synthetic-* "
                  "artifact name (python -m kd.synthetic generate makes one)")


def load_pool(ref: str, store=None, run=None) -> tuple[torch.Tensor, dict]:
    """uint8 images [N, 3, H, W] and the pool's metadata, from a pool file, its folder or an artifact name.

    The file's sha256 must match the one ``pool.json`` records; a mismatch or a missing file is a KDError.
    """
    file = pool_file(ref, store, run)
    if not file.exists():
        raise KDError(f"pool file {file} is missing: generate it with `python -m kd.synthetic generate ...`")
    meta = read_json(file.with_suffix(".json"), POOL)
    if not meta["sha256"]:
        raise KDError(f"{file.with_suffix('.json')} records no sha256: the pool cannot be verified")
    images = load_tensors(file, meta["sha256"]).get("images")
    if images is None or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = "no 'images' tensor" if images is None else f"{images.dtype} {tuple(images.shape)}"
        raise KDError(f"{file} is not a pool of uint8 [N, 3, H, W] images ({got})")
    if images.shape[0] != meta.get("count", images.shape[0]):
        raise KDError(f"{file} holds {images.shape[0]} images but its pool.json says {meta['count']}")
    return images, meta
