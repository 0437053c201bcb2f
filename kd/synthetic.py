"""Synthetic images from a diffusion model: a pool file (and W&B artifact) that distillation mixes in.

    python -m kd.synthetic generate --model=google/ddpm-cifar10-32 --dataset=cifar10 --num=50000 \\
        --scheduler=ddim --steps=100                       # -> runs/synthetic/cifar10-ddpm-cifar10-32/
    python -m kd.synthetic train --dataset=digits          # a small DDPM of your own -> generator-digits
    python -m kd.synthetic generate --model=generator-digits --dataset=digits --num=1000

``generate`` writes shards as it goes (``shards/shard-00003.safetensors``, their sha256 in
``shards/index.json``); image ``i`` is drawn from its own generator seeded by (seed, i) only, so a killed
run started again continues where it stopped and ends bit-identical to an uninterrupted one. The pool is
``pool.safetensors`` (key ``images``: uint8 [N, 3, H, W] at the dataset's resolution) with ``pool.json``
(metadata, sha256) and ``grid.png`` beside it, published as artifact ``synthetic-{dataset}-{source}``.
Distillation reads it with :func:`load_pool`.

``train`` fits an unconditional DDPM (diffusers UNet2DModel + DDPMScheduler, Accelerate, EMA weights) on
the dataset's training split, resumable from safetensors checkpoints (SIGTERM: a checkpoint, exit 143; a rerun
continues the same W&B run and logs no step twice), and saves a diffusers pipeline folder published as artifact
``generator-{dataset}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kd import faults
from kd.artifacts import local_versions, publish, resolve
from kd.config import parse_flags
from kd.data import DATASETS, epoch_generator, load_dataset
from kd.errors import NAME_RE, KDError, check_name
from kd.generator_presets import PRESETS, Preset
from kd.io import atomic_write, load_tensors, read_json, remove_stale_temps, save_tensors, sha256_file, write_json
from kd.wandb_runs import announce_mode, wandb_mode

SCHEDULERS = ("ddpm", "ddim", "dpm")
DEFAULT_STEPS = {"ddim": 100, "dpm": 25}  # ddpm: all of the model's training timesteps
DEFAULT_MODELS = {"cifar10": "google/ddpm-cifar10-32", "cifar100": "generator-cifar100",
                  "digits": "generator-digits"}
POOL_FILE = "pool.safetensors"


# ---------------------------------------------------------------------------------------------------------
# settings


@dataclass
class GenerateConfig:
    model: str = ""  # hub id, pipeline folder or generator artifact; "" -> the dataset's default
    dataset: str = "cifar10"
    num: int = 50000
    scheduler: str = "ddim"  # ddpm | ddim | dpm
    steps: str = "auto"  # auto: ddpm all training timesteps, ddim 100, dpm 25
    seed: int = 0
    batch_size: int = 256
    shard_size: int = 1024  # images per shard file (the unit of resumption)
    out: str = ""  # "" -> runs/synthetic/{dataset}-{source}
    store: str = ""  # local artifact store; "" -> $KD_STORE or ./artifacts
    source: str = ""  # names the pool; "" -> a sanitised model name
    project: str = "kd-fidelity"
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch; 0: torch's default (1 is faster on a busy machine)

    kind = "synthetic-data"

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise KDError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(sorted(DATASETS))}")
        if self.num <= 0:
            raise KDError(f"--num must be >= 1, got {self.num}")
        if self.scheduler not in SCHEDULERS:
            raise KDError(f"unknown scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if self.steps != "auto":
            try:
                steps = int(self.steps)
            except ValueError:
                raise KDError(f"--steps expects a positive integer or auto, got {self.steps!r}") from None
            if steps <= 0:
                raise KDError(f"--steps must be >= 1, got {steps}")
        if self.threads < 0:
            raise KDError(f"--threads must be >= 0 (0: torch's default), got {self.threads}")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise KDError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise KDError(f"--seed must be >= 0, got {self.seed}")
        if self.source:
            check_name(self.source, "source")
        check_name(self.project, "project")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise KDError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def model_ref(self) -> str:
        return self.model or DEFAULT_MODELS[self.dataset]

    def source_name(self) -> str:
        return self.source or source_name(self.model_ref())

    def artifact_name(self) -> str:
        return check_name(f"synthetic-{self.dataset}-{self.source_name()}", "artifact name")

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/synthetic/{self.dataset}-{self.source_name()}")


@dataclass
class GeneratorTrainConfig:
    dataset: str = "digits"
    preset: str = ""  # digits | cifar10 | cifar100; "" -> the dataset's name
    epochs: int = 0  # 0: the preset's value (likewise batch_size, lr, save_every, sample_every)
    batch_size: int = 0
    lr: float = 0.0
    save_every: int = 0
    sample_every: int = 0
    max_steps: int = 0  # > 0: stop (with a checkpoint) after this many optimizer steps; rerun to go on
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on a GPU, no on the CPU | no | bf16 | fp16
    cpu: bool = False
    data_dir: str = "data"
    out: str = ""  # "" -> runs/generator-{dataset}; the pipeline goes to OUT/pipeline
    store: str = ""
    project: str = "kd-fidelity"
    resume: str = "auto"  # auto: continue a matching checkpoint | True: must exist | False: start over
    threads: int = 0  # CPU threads for torch; 0: torch's default (1 is faster on a busy machine)

    kind = "generator"

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise KDError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(sorted(DATASETS))}")
        if self.preset_name() not in PRESETS:
            raise KDError(f"unknown preset {self.preset!r}: choose one of {', '.join(sorted(PRESETS))}")
        for name in ("epochs", "batch_size", "save_every", "sample_every", "max_steps", "seed", "threads"):
            if getattr(self, name) < 0:
                raise KDError(f"--{name} must be >= 0 (0: the preset's value), got {getattr(self, name)}")
        if not math.isfinite(self.lr) or self.lr < 0:
            raise KDError(f"--lr must be a finite number >= 0 (0: the preset's value), got {self.lr}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise KDError(f"--mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if str(self.resume) not in ("auto", "True", "False"):
            raise KDError(f"--resume must be auto, True or False, got {self.resume!r}")
        check_name(self.project, "project")

    def preset_name(self) -> str:
        return self.preset or self.dataset

    def recipe(self) -> Preset:
        p = PRESETS[self.preset_name()]
        over = {k: getattr(self, k) for k in ("epochs", "batch_size", "lr", "save_every", "sample_every")}
        return Preset(**{**asdict(p), **{k: v for k, v in over.items() if v}})

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/generator-{self.dataset}")


def source_name(model: str) -> str:
    """``google/ddpm-cifar10-32`` -> ``ddpm-cifar10-32``; ``runs/generator-digits/pipeline`` ->
    ``generator-digits``; an artifact name stays as it is."""
    path = Path(model).expanduser()
    if path.exists():
        path = path.resolve()
        name = path.parent.name if path.name == "pipeline" else path.name
    else:
        name = model.rstrip("/").rsplit("/", 1)[-1]
    clean = re.sub(r"\.\.+", ".", re.sub(r"[^A-Za-z0-9_.-]+", "-", name)).strip("-.")[:100]
    return check_name(clean or "model", "source")


# ---------------------------------------------------------------------------------------------------------
# models and sampling


def load_pipeline(model: str, store=None, run=None, dataset: str = "cifar10"):
    """A ``DDPMPipeline`` from a local folder, a generator artifact in the store, or a hub id."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    train_hint = (f"pass a local pipeline folder (--model=PATH) or train one with "
                  f"`python -m kd.synthetic train --dataset={dataset}` (then --model=generator-{dataset})")
    path = Path(model).expanduser()
    if not path.exists() and NAME_RE.match(model) and ".." not in model:  # no '/': an artifact name
        path = resolve(model, run=run, store=store, kind="generator", hint=f"; {train_hint}")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components": noise, and a second stderr line
    if path.exists():
        try:
            if (path / "model_index.json").exists():  # a pipeline folder
                pipe = DDPMPipeline.from_pretrained(str(path))
            else:  # a flat artifact folder: config.json + weights + scheduler_config.json
                pipe = DDPMPipeline(unet=UNet2DModel.from_pretrained(str(path)),
                                    scheduler=DDPMScheduler.from_pretrained(str(path)))
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise KDError(f"{path} is not a loadable diffusers DDPM pipeline folder ({reason}); {train_hint}") from None
    else:
        try:
            pipe = DDPMPipeline.from_pretrained(model)
        except (OSError, ValueError) as e:
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise KDError(f"cannot load model {model!r}: not a local folder, and the Hugging Face hub could not "
                          f"provide it ({type(e).__name__}: {reason}); {train_hint}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_fingerprint(unet, scheduler_config) -> str:
    """sha256 over the UNet's weights and the noise schedule: what decides the images."""
    h = hashlib.sha256()
    for k, v in unet.state_dict().items():
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    return h.hexdigest()


def scheduler_class(name: str):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    return {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[name]


def derived_seed(*parts) -> int:
    """A 63-bit seed that depends on ``parts`` only (e.g. (pool seed, image index))."""
    digest = hashlib.sha256(":".join(map(str, ("kd", *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def denoise(unet, scheduler_cls, scheduler_config, steps: int, generators: list[torch.Generator],
            device, dtype=torch.float32) -> torch.Tensor:
    """One batch, one image per (CPU) generator: the reverse process, float32 in [-1, 1] on the CPU.

    The UNet runs in ``dtype``; the scheduler's arithmetic stays in float32. A fresh scheduler per batch:
    multistep solvers keep state between steps.
    """
    sched = scheduler_cls.from_config(scheduler_config)
    sched.set_timesteps(steps, device=device)
    size = unet.config.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    shape = (unet.config.in_channels, *hw)
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(x, t).to(dtype), t).sample.float()
        x = sched.step(eps, t, x, generator=generators).prev_sample
    return x.cpu()


def to_pixels(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """float [-1, 1] [B, C, h, w] -> uint8 [B, 3, height, width] (antialiased resize; grey -> 3 channels)."""
    x = (x / 2 + 0.5).clamp(0, 1)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise KDError(f"the model makes {x.shape[1]}-channel images; a pool needs 1 or 3 channels")
    return (x * 255).round().clamp(0, 255).to(torch.uint8).contiguous()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, min_width: int = 256) -> Path:
    """uint8 [N, 3, H, W] -> a PNG grid of the first nrow*nrow images, upscaled (nearest) to be visible."""
    from PIL import Image

    x = images[: nrow * nrow].cpu()
    n, _, h, w = x.shape
    rows, gap = math.ceil(n / nrow), 1 if h < 16 else 2
    canvas = torch.full((3, rows * (h + gap) + gap, nrow * (w + gap) + gap), 128, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[:, gap + r * (h + gap): gap + r * (h + gap) + h, gap + c * (w + gap): gap + c * (w + gap) + w] = x[i]
    scale = max(1, math.ceil(min_width / canvas.shape[-1]))
    canvas = canvas.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    with atomic_write(path) as fh:
        Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(fh, format="PNG")
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# generate


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KDError(f"--device={name} but no CUDA device is visible: use --device=cpu")
    return torch.device(name)


def _start_run(project: str, name: str, job_type: str, config: dict, run_id: str | None = None):
    import wandb

    mode = wandb_mode()
    print(announce_mode(mode), file=sys.stderr)
    run = wandb.init(project=project, name=name, job_type=job_type, config=config, mode=mode, dir=_wandb_dir(),
                     id=run_id, resume="allow" if run_id else None)
    return run, mode


def _folder_run_id(out: Path) -> str:
    """The W&B run id of an output folder (``OUT/wandb-run.json``): a killed generation, rerun, continues it."""
    path = out / "wandb-run.json"
    if path.exists():
        return read_json(path)["run_id"]
    from wandb.sdk.lib.runid import generate_id

    run_id = generate_id()
    write_json(path, {"run_id": run_id})
    return run_id


def _last_logged_step(run, mode: str) -> int:
    """The highest step this (resumed) W&B run already holds, 0 if none: a rerun logs only the steps after it."""
    if mode == "online":
        return max(int(run.step) - 1, 0) if run.resumed else 0
    from kd.wandb_runs import last_logged_step

    return last_logged_step(run, mode)


def _wandb_dir() -> str | None:
    """$WANDB_DIR as it is now (wandb reads it once per process, at its first run)."""
    return os.environ.get("WANDB_DIR") or None


def _already_published(name: str, file: str, digest: str, store) -> Path | None:
    """The store's latest version of ``name`` when it already holds ``file`` with this sha256."""
    folder = local_versions(name, store)
    if folder is None:
        return None
    return folder if read_json(folder / "manifest.json")["files"].get(file) == digest else None


def _shard_path(out: Path, k: int) -> Path:
    return out / "shards" / f"shard-{k:05d}.safetensors"


def generate(cfg: GenerateConfig, *, stop_after_shards: int | None = None) -> Path | None:
    """Write (or finish) the pool ``cfg`` describes; returns the pool file.

    ``stop_after_shards`` (tests): return None after writing that many new shards, as a kill would.
    """
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    spec = DATASETS[cfg.dataset]
    out, name, store = cfg.out_dir(), cfg.artifact_name(), cfg.store or None
    device = _device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = None  # offline: a model that cannot be loaded is refused before anything is written (W&B included)
    if wandb_mode() != "online":  # online, it is resolved through the run, so W&B records the lineage
        pipe = load_pipeline(cfg.model_ref(), store=store, dataset=cfg.dataset)
    run, mode = _start_run(cfg.project, name, "synthetic", asdict(cfg), run_id=_folder_run_id(out))
    try:
        pool = _generate(cfg, spec, out, name, store, device, dtype, run, mode, stop_after_shards, pipe)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return pool


def _generate(cfg, spec, out, name, store, device, dtype, run, mode, stop_after_shards, pipe=None) -> Path | None:
    model = cfg.model_ref()
    if pipe is None:
        pipe = load_pipeline(model, store=store, run=run if mode != "disabled" else None, dataset=cfg.dataset)
    unet, sched_config = pipe.unet, pipe.scheduler.config
    train_steps = int(sched_config.get("num_train_timesteps", 1000))
    steps = int(cfg.steps) if cfg.steps != "auto" else DEFAULT_STEPS.get(cfg.scheduler, train_steps)
    if steps > train_steps:
        raise KDError(f"--steps={steps} exceeds the model's {train_steps} training timesteps")
    identity = {
        "model_sha256": model_fingerprint(unet, sched_config), "scheduler": cfg.scheduler, "steps": steps,
        "seed": cfg.seed, "shard_size": cfg.shard_size, "batch_size": cfg.batch_size, "device": device.type,
        "dtype": str(dtype).removeprefix("torch."), "height": spec.image_size, "width": spec.image_size,
    }
    unet = unet.to(device).eval()
    if dtype != torch.float32:
        unet = unet.to(dtype)
    sched_cls = scheduler_class(cfg.scheduler)

    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(shard_dir)  # left by a kill in the middle of a write (temps of live writers stay)
    remove_stale_temps(out)  # likewise of the pool file (as large as the pool)
    index_path = shard_dir / "index.json"
    index = read_json(index_path) if index_path.exists() else {"identity": identity, "shards": {}}
    if index["identity"] != identity:
        diff = sorted(k for k in identity if index["identity"].get(k) != identity[k])
        raise KDError(f"{shard_dir} holds shards of another generation (differs in {', '.join(diff)}): "
                      f"pass another --out or delete {shard_dir}")

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
    reused = sum(counts) - sum(counts[k] for k in todo)
    print(f"{model} -> {out}: {cfg.num} images {spec.image_size}x{spec.image_size}, {cfg.scheduler} {steps} "
          f"steps, seed {cfg.seed}, {device.type}/{identity['dtype']}; {n_shards - len(todo)}/{n_shards} shards "
          "already done", file=sys.stderr)

    from tqdm.auto import tqdm

    t0, made = time.perf_counter(), 0
    with tqdm(total=cfg.num, initial=reused, unit="img", desc=f"synthetic {cfg.dataset}", dynamic_ncols=True) as bar:
        for done, k in enumerate(todo):
            if stop_after_shards is not None and done >= stop_after_shards:
                return None
            first, parts = k * cfg.shard_size, []
            for b0 in range(0, counts[k], cfg.batch_size):
                ids = range(first + b0, first + min(counts[k], b0 + cfg.batch_size))
                gens = [torch.Generator("cpu").manual_seed(derived_seed(cfg.seed, i)) for i in ids]
                x = denoise(unet, sched_cls, sched_config, steps, gens, device, dtype)
                parts.append(to_pixels(x, spec.image_size, spec.image_size))
                bar.update(len(ids))
                made += len(ids)
                faults.point("synthetic-batch")  # mid-shard: its images so far only in memory
            digest = save_tensors(_shard_path(out, k), {"images": torch.cat(parts)})
            faults.point("shard-saved")  # the shard is in place, index.json does not list it yet
            index["shards"][str(k)] = {"count": counts[k], "sha256": digest}
            write_json(index_path, index)
    seconds = time.perf_counter() - t0
    rate = made / seconds if made else 0.0

    images = torch.cat([load_tensors(_shard_path(out, k), index["shards"][str(k)]["sha256"])["images"]
                        for k in range(n_shards)])
    meta = {"model": model, "source": cfg.source_name(), "dataset": cfg.dataset, "count": cfg.num,
            "height": spec.image_size, "width": spec.image_size, "artifact": name, **identity}
    pool_path = out / POOL_FILE
    meta["sha256"] = save_tensors(pool_path, {"images": images}, metadata={"count": cfg.num})
    faults.point("pool-saved")  # the pool is in place, pool.json (its hash) not yet
    write_json(out / "pool.json", meta)
    grid = save_grid(images, out / "grid.png")
    if made:
        print(f"generated {made} images in {seconds:.1f} s ({rate:.1f} img/s)", file=sys.stderr)

    import wandb

    if mode == "disabled" or _last_logged_step(run, mode) < 1:  # a rerun of the same W&B run logs step 1 once
        run.log({"synthetic/samples": wandb.Image(str(grid)), "synthetic/img_per_s": rate,
                 "synthetic/count": cfg.num}, step=1)
    same = _already_published(name, POOL_FILE, meta["sha256"], store)
    if same is not None and mode != "online":
        print(f"artifact {name}: the store already holds this pool ({same})", file=sys.stderr)
    else:
        where = publish(name, "dataset", [pool_path, out / "pool.json", grid], meta,
                        run=run if mode != "disabled" else None, store=store)
        print(f"artifact {name} ({where.name}) in {where.parent}", file=sys.stderr)
    print(f"pool: {pool_path} ({cfg.num} x 3 x {spec.image_size} x {spec.image_size} uint8, sha256 "
          f"{meta['sha256'][:12]}), grid: {grid}")
    return pool_path


# ---------------------------------------------------------------------------------------------------------
# load_pool: what distillation calls


def load_pool(ref: str, store=None, run=None) -> tuple[torch.Tensor, dict]:
    """uint8 images [N, 3, H, W] and the pool's metadata, from a pool file, its folder or an artifact name.

    The file's sha256 must match the one ``pool.json`` records; a mismatch or a missing file is a KDError.
    """
    ref = str(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        file = path / POOL_FILE
    elif path.is_file() or path.suffix == ".safetensors":
        file = path
    elif NAME_RE.match(ref) and ".." not in ref:
        hint = (": create it with `python -m kd.synthetic generate --dataset=... --model=...`, "
                "or pass a pool file or folder")
        file = resolve(ref, run=run, store=store, kind="synthetic pool", hint=hint) / POOL_FILE
    else:
        raise KDError(f"synthetic pool {ref!r} not found: pass a pool file, its folder or a synthetic-* "
                      "artifact name (python -m kd.synthetic generate makes one)")
    if not file.exists():
        raise KDError(f"pool file {file} is missing: generate it with `python -m kd.synthetic generate ...`")
    meta = read_json(file.with_suffix(".json"))
    if not meta.get("sha256"):
        raise KDError(f"{file.with_suffix('.json')} records no sha256: the pool cannot be verified")
    images = load_tensors(file, meta["sha256"]).get("images")
    if images is None or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = "no 'images' tensor" if images is None else f"{images.dtype} {tuple(images.shape)}"
        raise KDError(f"{file} is not a pool of uint8 [N, 3, H, W] images ({got})")
    if images.shape[0] != meta.get("count", images.shape[0]):
        raise KDError(f"{file} holds {images.shape[0]} images but its pool.json says {meta['count']}")
    return images, meta


# ---------------------------------------------------------------------------------------------------------
# train


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _save_checkpoint(folder: Path, step: int, unet, ema, optimizer, info: dict) -> None:
    """One safetensors file (UNet, EMA, optimizer state) + ``state.json`` (written last, names it)."""
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"ema.{i}": p for i, p in enumerate(ema.shadow_params)})
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"opt.{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    fname = f"step-{step:08d}.safetensors"
    digest = save_tensors(folder / fname, tensors)
    ema_state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    write_json(folder / "state.json", {**info, "step": step, "file": fname, "sha256": digest,
                                       "param_groups": opt["param_groups"], "ema": ema_state})
    for old in folder.glob("step-*.safetensors"):
        if old.name != fname:
            old.unlink()


def _load_checkpoint(folder: Path, state: dict, unet, ema, optimizer) -> None:
    tensors = load_tensors(folder / state["file"], state["sha256"])
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    ema.load_state_dict({**state["ema"], "shadow_params": [tensors[f"ema.{i}"] for i in range(len(ema.shadow_params))]})
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})


@torch.no_grad()
def _sample_grid(unet, recipe: Preset, noise_config, n: int, device) -> torch.Tensor:
    gens = [torch.Generator("cpu").manual_seed(derived_seed("grid", i)) for i in range(n)]
    size = recipe.unet["sample_size"]
    x = denoise(unet, scheduler_class("ddim"), noise_config, recipe.sample_steps, gens, device)
    return to_pixels(x, size, size)


def _export(out: Path, unet_config, ema, noise_scheduler) -> Path:
    """DDPMPipeline(unet=EMA weights) saved to ``out/pipeline`` (swapped in whole, never half-written)."""
    from diffusers import DDPMPipeline, UNet2DModel

    unet = UNet2DModel.from_config(unet_config)
    ema.copy_to(unet.parameters())
    tmp, final, old = out / ".pipeline-incoming", out / "pipeline", out / ".pipeline-old"
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    DDPMPipeline(unet=unet.to("cpu"), scheduler=noise_scheduler).save_pretrained(str(tmp))
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def train(cfg: GeneratorTrainConfig) -> Path:
    """Fit (or continue fitting) the DDPM ``cfg`` describes; returns the saved pipeline folder."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    recipe, out, store = cfg.recipe(), cfg.out_dir(), cfg.store or None
    ckpt_dir = out / "checkpoints"
    identity = {"dataset": cfg.dataset, "preset": cfg.preset_name(), "seed": cfg.seed,
                **{k: v for k, v in asdict(recipe).items() if k not in ("save_every", "sample_every")}}
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as read back from JSON
    state = None
    if (ckpt_dir / "state.json").exists() and cfg.resume != "False":
        state = read_json(ckpt_dir / "state.json")
        if state["identity"] != identity:
            diff = sorted(k for k in identity if state["identity"].get(k) != identity[k])
            raise KDError(f"the checkpoint in {ckpt_dir} was made with other settings (differs in "
                          f"{', '.join(diff)}): pass --resume=False to start over, or another --out")
    elif cfg.resume == "True":
        raise KDError(f"--resume=True but there is no checkpoint in {ckpt_dir}")

    mode = wandb_mode()
    cuda = torch.cuda.is_available() and not cfg.cpu
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if cuda else "no")
    accelerator = Accelerator(mixed_precision=mp, cpu=cfg.cpu, log_with=None if mode == "disabled" else "wandb")
    main_proc = accelerator.is_main_process
    if main_proc:
        print(announce_mode(mode), file=sys.stderr)
    import wandb

    if cfg.resume == "False" and main_proc:
        (out / "wandb-run.json").unlink(missing_ok=True)  # starting over is a new W&B run
    run_id = state["wandb_id"] if state else _folder_run_id(out)  # killed before a checkpoint: the same run
    accelerator.init_trackers(cfg.project, config={**asdict(cfg), "recipe": identity}, init_kwargs={"wandb": {
        "name": f"generator-{cfg.dataset}", "job_type": "train-generator", "mode": mode, "id": run_id,
        "resume": "allow", "dir": _wandb_dir()}})
    run = accelerator.get_tracker("wandb", unwrap=True) if main_proc and mode != "disabled" else None
    seen = _last_logged_step(run, mode) if run is not None else 0  # steps logged before a kill are not logged again
    history = list(state.get("history", [])) if state else []  # the logged rows, kept in every checkpoint
    for row in history:  # rows W&B lost when the last process was killed (it loses what it had not flushed)
        if row["step"] > seen:
            accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    data = load_dataset(cfg.dataset, cfg.data_dir, device=accelerator.device)
    channels = recipe.unet["in_channels"]
    images = data.train_x[:, :channels]
    n, world, rank = images.shape[0], accelerator.num_processes, accelerator.process_index
    steps_per_epoch = n // recipe.batch_size
    if steps_per_epoch < 1:
        raise KDError(f"--batch_size={recipe.batch_size} exceeds the {n} training images of {cfg.dataset}")
    total = recipe.epochs * steps_per_epoch
    stop = min(total, cfg.max_steps) if cfg.max_steps else total

    torch.manual_seed(cfg.seed)
    unet = UNet2DModel(**recipe.unet)
    noise_scheduler = DDPMScheduler(**recipe.noise)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=recipe.ema_decay, use_ema_warmup=True, power=recipe.ema_power,
                   model_cls=UNet2DModel, model_config=unet.config)
    step = 0
    if state:
        _load_checkpoint(ckpt_dir, state, unet, ema, optimizer)
        step = state["step"]
        if main_proc:
            print(f"resuming {ckpt_dir} at step {step}/{total}", file=sys.stderr)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema.to(accelerator.device)
    raw = accelerator.unwrap_model(unet)
    n_params = sum(p.numel() for p in raw.parameters())
    if main_proc:
        print(f"generator {cfg.preset_name()}: {n_params / 1e6:.2f}M parameters, {n} images, "
              f"{steps_per_epoch} steps/epoch, {total} steps in all; on {accelerator.device} ({mp})",
              file=sys.stderr)

    def checkpoint(loss: float) -> None:
        accelerator.wait_for_everyone()
        if main_proc:
            _save_checkpoint(ckpt_dir, step, raw, ema, optimizer, {"identity": identity, "wandb_id": run_id,
                                                                  "loss": loss, "total": total, "history": history})

    def log_samples() -> None:
        if not main_proc:
            return
        ema.store(raw.parameters())
        ema.copy_to(raw.parameters())
        raw.eval()
        grid = save_grid(_sample_grid(raw, recipe, noise_scheduler.config, 64, accelerator.device),
                         out / "samples.png")
        raw.train()
        ema.restore(raw.parameters())
        if step > seen:
            accelerator.log({"generator/samples": wandb.Image(str(grid))}, step=step)

    t0, start, loss_sum, loss_n, perm_epoch, perm = time.perf_counter(), step, 0.0, 0, -1, None
    last_loss = state["loss"] if state else float("nan")
    unet.train()
    bar = tqdm(total=stop, initial=step, unit="step", desc=f"generator {cfg.dataset}", disable=not main_proc,
               dynamic_ncols=True)
    terms: list[int] = []  # SIGTERM: checkpoint at the next step, then exit 143
    old_handler = signal.signal(signal.SIGTERM, lambda signum, frame: terms.append(signum)) if (
        threading.current_thread() is threading.main_thread()) else None
    try:
        while step < stop:
            epoch, within = divmod(step, steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = torch.randperm(n, generator=epoch_generator(cfg.seed, epoch, "cpu")), epoch
            idx = perm[within * recipe.batch_size:(within + 1) * recipe.batch_size][rank::world].to(accelerator.device)
            g = torch.Generator(accelerator.device).manual_seed(derived_seed(cfg.seed, step, rank))
            clean = images[idx].float().div(127.5).sub(1.0)
            if recipe.flip:
                flip = torch.rand(clean.shape[0], generator=g, device=clean.device) < 0.5
                clean = torch.where(flip[:, None, None, None], clean.flip(-1), clean)
            noise = torch.randn(clean.shape, generator=g, device=clean.device)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), generator=g,
                              device=clean.device)
            noisy = noise_scheduler.add_noise(clean, noise, t)
            lr = lr_at(step, total, recipe.lr, recipe.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with accelerator.autocast():
                loss = F.mse_loss(unet(noisy, t).sample.float(), noise)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(raw.parameters())
            step += 1
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            bar.update(1)
            if step % 10 == 0 or step == stop:
                last_loss, loss_sum, loss_n = loss_sum / loss_n, 0.0, 0
                bar.set_postfix(loss=f"{last_loss:.4f}")
                row = {"generator/loss": last_loss, "generator/lr": lr, "epoch": step / steps_per_epoch,
                       "generator/ema_decay": ema.cur_decay_value}
                history.append({"step": step, **row})
                if step > seen:
                    accelerator.log(row, step=step)
            if step % recipe.save_every == 0 or step == stop:
                checkpoint(last_loss)
            if step % recipe.sample_every == 0 or step == total:
                log_samples()
            faults.point("generator-step")
            if terms and step < stop:
                checkpoint(last_loss)
                bar.close()
                accelerator.end_training()
                print(f"interrupted at step {step}: checkpoint saved; run the same command again to resume",
                      file=sys.stderr)
                raise SystemExit(143)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    bar.close()
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()

    pipeline = None
    if main_proc:
        if step > start and step != total and step % recipe.sample_every:
            log_samples()
        pipeline = _export(out, raw.config, ema, noise_scheduler)
        name = f"generator-{cfg.dataset}"
        files = [pipeline / "model_index.json", pipeline / "unet" / "config.json",
                 pipeline / "unet" / "diffusion_pytorch_model.safetensors",
                 pipeline / "scheduler" / "scheduler_config.json"]
        meta = {"preset": cfg.preset_name(), "dataset": cfg.dataset, "step": step, "total_steps": total,
                "loss": last_loss, "params": n_params, "sample_size": recipe.unet["sample_size"],
                "weights_sha256": sha256_file(files[2])}
        speed = f"{(step - start) / seconds:.1f} steps/s" if step > start else "nothing left to train"
        print(f"trained to step {step}/{total} in {seconds:.1f} s ({speed}); pipeline: {pipeline}",
              file=sys.stderr)
        same = _already_published(name, files[2].name, meta["weights_sha256"], store)
        if same is not None and mode != "online":
            print(f"artifact {name}: the store already holds these weights ({same})", file=sys.stderr)
        else:
            where = publish(name, "model", files, meta, run=run, store=store)
            print(f"artifact {name} ({where.name}) in {where.parent}: generate with --model={name}",
                  file=sys.stderr)
    accelerator.end_training()
    return pipeline if pipeline is not None else out / "pipeline"


# ---------------------------------------------------------------------------------------------------------

USAGE = """usage: python -m kd.synthetic generate --dataset=D [--model=M] [--num=N] [--scheduler=ddpm|ddim|dpm] ...
       python -m kd.synthetic train --dataset=D [--preset=digits|cifar10|cifar100] [--epochs=E] ...
       python -m kd.synthetic generate --help   (all settings and their defaults)"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(USAGE)
            return
        command, rest = argv[0], argv[1:]
        if command == "generate":
            generate(parse_flags(GenerateConfig, rest))
        elif command == "train":
            train(parse_flags(GeneratorTrainConfig, rest))
        else:
            raise KDError(f"unknown command {command!r}: use generate or train (python -m kd.synthetic --help)")
    except KDError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
