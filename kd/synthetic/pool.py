"""Pools of synthetic images: :func:`generate` writes one (sharded, resumable, bit-identical per seed, with its
FID), :func:`kd.pools.load_pool` reads one for distillation.

``generate`` writes shards as it goes (``shards/shard-00003.safetensors``, their sha256 in ``shards/index.json``);
image ``i`` is drawn from its own generator seeded by (seed, i) only, so a killed run started again continues
where it stopped and ends bit-identical to an uninterrupted one. The pool is ``pool.safetensors`` (key
``images``: uint8 [N, 3, H, W] at the dataset's resolution) with ``pool.json`` (metadata, sha256, FID) and
``grid.png`` beside it, published as artifact ``synthetic-{dataset}-{source}``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from kd import faults, names
from kd.data import load_dataset
from kd.datasets import DATASETS
from kd.errors import KDError, one_line
from kd.generators import load_sampler
from kd.generators.sampling import save_grid, to_pixels
from kd.io import (
    POOL,
    SHARD_INDEX,
    load_tensors,
    read_json,
    remove_stale_temps,
    save_tensors,
    sha256_file,
    write_json,
)
from kd.pools import POOL_FILE
from kd.session import Session
from kd.synthetic import quality
from kd.synthetic.config import GenerateConfig

QUALITY_KEYS = ("fid", "fid_reason", "inception_score", "inception_score_std", "fid_features", "fid_real_images")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KDError(f"--device={name} but no CUDA device is visible: use --device=cpu")
    return torch.device(name)


def _shard_path(out: Path, k: int) -> Path:
    return out / "shards" / f"shard-{k:05d}.safetensors"


def generate(cfg: GenerateConfig, *, stop_after_shards: int | None = None, quality_feature=None) -> Path | None:
    """Write (or finish) the pool ``cfg`` describes, as a run of its own (:class:`kd.session.Session`: a rerun of
    a finished pool says "already finished"); returns the pool file.

    ``stop_after_shards`` (tests): return None after writing that many new shards, as a kill would.
    ``quality_feature`` (tests): a stand-in feature extractor for FID/IS in place of the Inception.
    """
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    session = Session(cfg, job="synthetic")
    if session.already_finished():
        return session.run_dir / POOL_FILE
    sampler = None  # offline: a model that cannot be loaded is refused before anything is written (W&B included)
    if session.mode != "online":  # online, it is resolved through the run, so W&B records the lineage
        sampler = load_sampler(cfg.model_ref(), cfg, device, store=cfg.store or None)
    if cfg.fid == "True" and quality_feature is None:
        _require_inception()
    with session.tracked():
        session.start_tracking(tags=["synthetic", cfg.dataset])
        if sampler is None:
            sampler = load_sampler(cfg.model_ref(), cfg, device, store=cfg.store or None, run=session.tracker.run)
        pool = _generate(cfg, sampler, session, stop_after_shards, quality_feature)
    return pool


def _require_inception() -> None:
    try:
        quality.check_standard()
    except quality.QualityUnavailable as e:
        raise KDError(f"--fid=True but {e}; or pass --fid=auto to make the pool without FID") from None


def _identity(cfg: GenerateConfig, sampler) -> dict:
    size = DATASETS[cfg.dataset].image_size
    return {**sampler.identity(), "seed": cfg.seed, "shard_size": cfg.shard_size, "batch_size": cfg.batch_size,
            "height": size, "width": size}


def _open_index(out: Path, identity: dict) -> tuple[dict, Path]:
    """shards/index.json (the finished shards and their sha256), refused when made for another identity."""
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(shard_dir)  # left by a kill in the middle of a write (temps of live writers stay)
    remove_stale_temps(out)  # likewise of the pool file (as large as the pool)
    index_path = shard_dir / "index.json"
    index = read_json(index_path, SHARD_INDEX) if index_path.exists() else {"identity": identity, "shards": {}}
    if index["identity"] != identity:
        diff = sorted(k for k in identity if index["identity"].get(k) != identity[k])
        raise KDError(f"{shard_dir} holds shards of another generation (differs in {', '.join(diff)}): "
                      f"pass another --out or delete {shard_dir}")
    return index, index_path


def _todo(cfg: GenerateConfig, out: Path, index: dict) -> tuple[list[int], list[int]]:
    """(images per shard, the shards still to make): missing, unlisted or corrupt ones."""
    n_shards = math.ceil(cfg.num / cfg.shard_size)
    counts = [min(cfg.shard_size, cfg.num - k * cfg.shard_size) for k in range(n_shards)]
    todo = []
    for k, count in enumerate(counts):
        entry, path = index["shards"].get(str(k)), _shard_path(out, k)
        if entry and entry["count"] == count and path.exists() and sha256_file(path) == entry["sha256"]:
            continue
        if entry and entry["count"] == count:
            print(f"shard {k} is missing or corrupt (sha256 mismatch): generating it again", file=sys.stderr)
        todo.append(k)
    return counts, todo


def _make_shards(cfg, sampler, out: Path, index: dict, index_path: Path, counts: list[int], todo: list[int],
                 stop_after_shards: int | None) -> int | None:
    """Sample the shards in ``todo``; each is written, then listed in index.json. Returns the images made
    (None when ``stop_after_shards`` cut it short)."""
    from tqdm.auto import tqdm

    size, made = DATASETS[cfg.dataset].image_size, 0
    reused = sum(counts) - sum(counts[k] for k in todo)
    with tqdm(total=cfg.num, initial=reused, unit="img", desc=f"synthetic {cfg.dataset}", dynamic_ncols=True) as bar:
        for done, k in enumerate(todo):
            if stop_after_shards is not None and done >= stop_after_shards:
                return None
            first, parts = k * cfg.shard_size, []
            for b0 in range(0, counts[k], cfg.batch_size):
                ids = range(first + b0, first + min(counts[k], b0 + cfg.batch_size))
                parts.append(to_pixels(sampler(ids, cfg.seed), size, size))
                bar.update(len(ids))
                made += len(ids)
                faults.point("synthetic-batch")  # mid-shard: its images so far only in memory
            digest = save_tensors(_shard_path(out, k), {"images": torch.cat(parts)})
            faults.point("shard-saved")  # the shard is in place, index.json does not list it yet
            index["shards"][str(k)] = {"count": counts[k], "sha256": digest}
            write_json(index_path, index)
    return made


def _generate(cfg, sampler, session, stop_after_shards, quality_feature) -> Path | None:
    out = session.run_dir
    identity = _identity(cfg, sampler)
    index, index_path = _open_index(out, identity)
    counts, todo = _todo(cfg, out, index)
    size = identity["height"]
    print(f"{cfg.model_label()} -> {out}: {cfg.num} images {size}x{size}, {sampler.describe()}, seed {cfg.seed}, "
          f"{identity['device']}/{identity['dtype']}; {len(counts) - len(todo)}/{len(counts)} shards already done",
          file=sys.stderr)
    t0 = time.perf_counter()
    made = _make_shards(cfg, sampler, out, index, index_path, counts, todo, stop_after_shards)
    if made is None:
        return None
    seconds = time.perf_counter() - t0
    rate = made / seconds if made else 0.0
    if made:
        print(f"generated {made} images in {seconds:.1f} s ({rate:.1f} img/s)", file=sys.stderr)
    images = torch.cat([load_tensors(_shard_path(out, k), index["shards"][str(k)]["sha256"])["images"]
                        for k in range(len(counts))])
    meta = {"model": cfg.model_label(), "source": cfg.source_name(), "dataset": cfg.dataset, "count": cfg.num,
            "generator": sampler.kind, "artifact": cfg.artifact_name(), **identity}
    if sampler.kind == "sngan":
        meta["generator_step"] = sampler.step
    pool_path = out / POOL_FILE
    meta["sha256"] = save_tensors(pool_path, {"images": images}, metadata={"count": cfg.num})
    faults.point("pool-saved")  # the pool is in place, pool.json (its hash) not yet
    meta.update(_quality(cfg, images, out / "pool.json", meta["sha256"], quality_feature, sampler.device))
    write_json(out / "pool.json", meta)
    grid = save_grid(images, out / "grid.png")
    _log_and_publish(cfg, session, meta, pool_path, grid, rate)
    return pool_path


def _quality(cfg, images: torch.Tensor, meta_path: Path, digest: str, feature, device) -> dict:
    """FID and IS of the finished pool (those of an earlier run of the same pool are kept), else null and why."""
    if cfg.fid == "False":
        return {"fid": None, "fid_reason": "not computed (--fid=False)", "inception_score": None}
    features = quality.STANDARD if feature is None else type(feature).__name__
    old = read_json(meta_path, POOL) if meta_path.exists() else {}
    if old.get("sha256") == digest and old.get("fid") is not None and old.get("fid_features") == features:
        return {k: old[k] for k in QUALITY_KEYS if k in old}
    try:
        real = load_dataset(cfg.dataset, cfg.data_dir).train_x
        result = quality.pool_quality(images, real, feature=feature, device=device)
    except (quality.QualityUnavailable, KDError, ValueError) as e:
        if cfg.fid == "True":
            raise KDError(f"--fid=True but the pool's FID cannot be computed: {e}") from None
        print(f"note: the pool is made without FID: {one_line(e)}", file=sys.stderr)
        return {"fid": None, "fid_reason": one_line(e), "inception_score": None}
    print(f"FID {result['fid']:.2f} against the {result['fid_real_images']} {cfg.dataset} training images "
          f"({result['fid_features']}), Inception Score {result['inception_score']:.2f}", file=sys.stderr)
    return result


def _log_and_publish(cfg, session, meta: dict, pool_path: Path, grid: Path, rate: float) -> None:
    tracker = session.tracker
    if tracker.seen < 1:  # a rerun of the same W&B run logs step 1 once
        row = {"synthetic/img_per_s": rate, "synthetic/count": cfg.num}
        if meta.get("fid") is not None:
            row.update({"synthetic/fid": meta["fid"], "synthetic/inception_score": meta["inception_score"]})
        tracker.log(row, step=1)
        tracker.image("synthetic/samples", grid, step=1)
    where = session.publish(meta["artifact"], "dataset", [pool_path, pool_path.with_suffix(".json"), grid], meta)
    print(f"artifact {meta['artifact']} ({where.name}) in {where.parent}", file=sys.stderr)
    session.finish({"synthetic/count": cfg.num, "synthetic/fid": meta.get("fid"), names.FINAL: True})
    size = meta["height"]
    print(f"pool: {pool_path} ({cfg.num} x 3 x {size} x {size} uint8, sha256 {meta['sha256'][:12]}), grid: {grid}")
