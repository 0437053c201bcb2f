"""Sampling machinery shared by pools and trainers: seeds per image, the reverse diffusion, pixels, grids.

* :func:`derived_seed`: image ``i`` of a pool draws from its own generator seeded by (seed, i) only, so a pool
  is bit-identical however it is batched, sharded or resumed (the SN-GAN's latents likewise).
* :func:`load_pipeline`: a diffusers ``DDPMPipeline`` from a folder, a generator artifact or a hub id.
* :func:`denoise`: one batch of the reverse process; :func:`to_pixels`: [-1, 1] floats -> uint8 pool images;
  :func:`save_grid`: a PNG of the first images.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from kd.artifacts import resolve
from kd.errors import NAME_RE, KDError, first_line
from kd.io import atomic_write


def train_hint(dataset: str) -> str:
    return (f"pass a local pipeline folder (--model=PATH) or train one with "
            f"`python -m kd.synthetic train --dataset={dataset}` (then --model=generator-{dataset})")


def model_path(model: str, store=None, run=None, dataset: str = "cifar10") -> Path:
    """A local folder for ``model``: itself, or a generator artifact (a name without '/') from the store;
    a name that is neither stays a path that does not exist (a hub id)."""
    path = Path(model).expanduser()
    if not path.exists() and NAME_RE.match(model) and ".." not in model:  # no '/': an artifact name
        path = resolve(model, run=run, store=store, kind="generator", hint=f"; {train_hint(dataset)}")
    return path


def load_pipeline(model: str, store=None, run=None, dataset: str = "cifar10"):
    """A ``DDPMPipeline`` from a local folder, a generator artifact in the store, or a hub id."""
    return pipeline_at(model_path(model, store, run, dataset), model, dataset)


def pipeline_at(path: Path, model: str, dataset: str):
    """The ``DDPMPipeline`` in folder ``path`` (as :func:`model_path` found it), else hub id ``model``."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
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
            reason = first_line(e)
            raise KDError(f"{path} is not a loadable diffusers DDPM pipeline folder ({reason}); "
                          f"{train_hint(dataset)}") from None
    else:
        try:
            pipe = DDPMPipeline.from_pretrained(model)
        except (OSError, ValueError) as e:
            reason = first_line(e, 160)
            raise KDError(f"cannot load model {model!r}: not a local folder, and the Hugging Face hub could not "
                          f"provide it ({type(e).__name__}: {reason}); {train_hint(dataset)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_fingerprint(model: torch.nn.Module, config=None) -> str:
    """sha256 over a model's weights and buffers (and e.g. the noise schedule): what decides the images."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    if config is not None:
        cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    return h.hexdigest()


def scheduler_class(name: str):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    return {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[name]


def derived_seed(*parts) -> int:
    """A 63-bit seed that depends on ``parts`` only (e.g. (pool seed, image index))."""
    digest = hashlib.sha256(":".join(map(str, ("kd", *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_generators(ids, *prefix) -> list[torch.Generator]:
    """One CPU generator per image id, seeded by derived_seed(*prefix, id)."""
    return [torch.Generator("cpu").manual_seed(derived_seed(*prefix, i)) for i in ids]


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
