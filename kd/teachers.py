"""Finding, verifying and loading teachers; the exact teacher-output cache over augmented views."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kd import tracking
from kd.config import KDError
from kd.data import Data, apply_views
from kd.io import load_tensors, read_json, save_tensors, write_json
from kd.models import Ensemble, build_model

_SEED = re.compile(r"-s(\d+)$")


def teacher_name(dataset: str, arch: str, seed: int) -> str:
    return f"teacher-{dataset}-{arch}-s{seed}"


def available_teachers(dataset: str, arch: str, store=None, online_project: str | None = None) -> list[str]:
    """Teacher artifact names for (dataset, arch), sorted by seed: the local store, plus W&B when online."""
    prefix = f"teacher-{dataset}-{arch}-s"
    names = set(n for n in tracking.list_artifacts(prefix, store) if _SEED.search(n))
    if online_project and tracking.wandb_mode() == "online":
        import wandb

        api = wandb.Api()
        for coll in api.artifact_collections(online_project, "model"):
            if coll.name.startswith(prefix) and _SEED.search(coll.name):
                names.add(coll.name)
    return sorted(names, key=lambda n: int(_SEED.search(n).group(1)))


def select_block(available: list[str], m: int, trial: int) -> list[str]:
    """The authors' choice: a contiguous block of m teachers starting at (trial * m) mod N."""
    n = len(available)
    start = (trial * m) % n
    return [available[(start + i) % n] for i in range(m)]


def choose_teachers(cfg, online_project: str | None = None) -> list[str]:
    if cfg.teacher_names():
        return cfg.teacher_names()
    arch = cfg.teacher_arch or cfg.arch
    have = available_teachers(cfg.dataset, arch, cfg.store, online_project)
    if cfg.ensemble_size > len(have):
        listing = ", ".join(have) if have else "none"
        raise KDError(
            f"--ensemble_size={cfg.ensemble_size} needs {cfg.ensemble_size} teachers for {cfg.dataset}/{arch} "
            f"but {len(have)} exist ({listing}): train more with `python train.py --dataset={cfg.dataset} "
            f"--arch={arch} --seed=K` (or the sweep sweeps/<dataset>/teachers.yaml)"
        )
    return select_block(have, cfg.ensemble_size, cfg.trial)


def load_teachers(names: list[str], data: Data, run=None, store=None, device="cpu"):
    """Verified teacher modules (eval mode) and their metadata; refuses other datasets or class counts."""
    members, metas = [], []
    for name in names:
        folder = tracking.resolve(name, run=run, store=store, kind="teacher",
                                  hint="; train it with train.py or pass other --teachers")
        from kd.io import load_weights

        state, meta = load_weights(folder, device="cpu")
        if meta.get("dataset") != data.spec.name or meta.get("num_classes") != data.spec.num_classes:
            raise KDError(
                f"teacher {name} was trained on {meta.get('dataset')} with {meta.get('num_classes')} classes, "
                f"not {data.spec.name} with {data.spec.num_classes}: choose teachers of this dataset"
            )
        model = build_model(meta["arch"], meta["num_classes"])
        model.load_state_dict(state)
        members.append(model.to(device).eval())
        metas.append(meta)
    return members, metas


# ---------------------------------------------------------------------------------------------------------
# the teacher-output cache


def cache_key(teacher_hashes: list[str], data: Data) -> str:
    spec = data.spec
    blob = json.dumps({"teachers": teacher_hashes, "dataset": spec.name, "n": data.n_train, "pad": spec.pad,
                       "flip": spec.flip, "views": data.num_views, "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def all_view_targets(ensemble: Ensemble, data: Data, batch_size: int = 1024, autocast=None,
                     dtype: torch.dtype = torch.float32, progress: bool = True) -> torch.Tensor:
    """Ensemble log-probabilities for every (training image, view): [n_train, n_views, C]."""
    import contextlib

    n, v = data.n_train, data.num_views
    out = None
    ctx = autocast or contextlib.nullcontext
    pairs = n * v
    bar = tqdm(total=pairs, desc="teacher cache", unit="img", disable=not progress, mininterval=1.0)
    img = torch.arange(n, device=data.train_x.device).repeat_interleave(v)
    views = torch.arange(v, device=data.train_x.device).repeat(n)
    for s in range(0, pairs, batch_size):
        i, w = img[s:s + batch_size], views[s:s + batch_size]
        x = apply_views(data.train_x[i], w, data.spec).contiguous(memory_format=torch.channels_last)
        with ctx():
            lp = ensemble(x).float()
        if out is None:
            out = torch.empty(n, v, lp.shape[-1], dtype=dtype, device=lp.device)
        out[i, w] = lp.to(dtype)
        bar.update(len(i))
    bar.close()
    return out


def cached_targets(ensemble: Ensemble, data: Data, teacher_hashes: list[str], root: Path, dtype: torch.dtype,
                   autocast=None, main: bool = True) -> tuple[torch.Tensor, Path, bool]:
    """Load the cache for these teachers and dataset, or build it (atomically, verified by hash on load)."""
    key = cache_key(teacher_hashes, data)
    path = Path(root) / f"teacher-targets-{key}.safetensors"
    meta_path = path.with_suffix(".json")
    dev = data.train_x.device
    if meta_path.exists():
        meta = read_json(meta_path)
        if meta.get("dtype") == str(dtype):
            t = load_tensors(path, meta["sha256"], device=str(dev))["log_probs"]
            return t, path, False
    targets = all_view_targets(ensemble, data, autocast=autocast, dtype=dtype, progress=main)
    if main:
        digest = save_tensors(path, {"log_probs": targets})
        write_json(meta_path, {"sha256": digest, "dtype": str(dtype), "shape": list(targets.shape),
                               "teachers": teacher_hashes, "dataset": data.spec.name, "key": key})
    return targets, path, True
