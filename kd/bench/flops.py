"""FLOPs an image of the study's models, counted by ``torch.utils.flop_counter`` on the meta device (no weights,
no data, well under a second): the work the projection (:mod:`kd.bench.projection`) puts beside its hours."""

from __future__ import annotations

import functools

import torch

from kd.bench.common import CLASSES


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@functools.cache
def model_flops(arch: str, batch: int = 2) -> dict[str, float]:
    """{"forward": a forward, "step": forward + backward} of ``arch`` on 32 px, per image."""
    from kd.models import build_model

    with torch.device("meta"):
        model = build_model(arch, CLASSES).train()
        x = torch.empty(batch, 3, 32, 32)
    forward = _count(lambda: model(x)) / batch
    step = _count(lambda: model(x).sum().backward()) / batch
    return {"forward": forward, "step": step}


@functools.cache
def unet_flops(preset: str) -> float | None:
    """A forward of kd.synthetic's DDPM UNet of ``preset`` per image (None: diffusers cannot build it here)."""
    try:
        from diffusers import UNet2DModel

        from kd.bench.sampler import synthetic_api

        recipe = synthetic_api()[2][preset]
        with torch.device("meta"):
            unet = UNet2DModel(**recipe.unet)
            side = recipe.unet["sample_size"]
            x = torch.empty(1, recipe.unet.get("in_channels", 3), side, side)
            t = torch.zeros(1, dtype=torch.long)
        with torch.no_grad():
            return _count(lambda: unet(x, t))
    except (ImportError, KeyError, RuntimeError, ValueError) as e:  # an optional figure: said, then left out
        import sys

        print(f"note: the pool's FLOPs are not counted ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
        return None


def study_flops(study: dict) -> dict[str, float | None]:
    """What :func:`kd.bench.projection.work` takes for ``study``."""
    return {**model_flops(study["arch"]), "unet": unet_flops(study["unet"])}
