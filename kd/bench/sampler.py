"""The synthetic section: images/s of kd.synthetic's sampler (the batch loop of ``python -m kd.synthetic
generate``: per-image generators, a fresh scheduler per batch, the UNet in bf16 on a GPU) with a randomly
initialised UNet2DModel of one of kd.synthetic's DDPM recipes (the CPU: the 8 px digits demo generator; a
GPU: the google/ddpm-cifar10-32 architecture), for the DDPM, DDIM and DPM-Solver++ schedulers and a few step
counts, and the pool recipe (DDIM, 100 steps) at a larger batch too."""

from __future__ import annotations

import statistics

import torch

from kd.bench.common import Bench, interleave, timed
from kd.bench.table import note


def synthetic_api():
    """(denoise, scheduler_class, PRESETS) of kd.synthetic, imported only when this section runs."""
    from kd.generators.presets import PRESETS
    from kd.synthetic import denoise, scheduler_class

    return denoise, scheduler_class, PRESETS


@torch.no_grad()
def bench_synthetic(b: Bench) -> dict:
    from diffusers import DDPMScheduler, UNet2DModel

    sizes, device = b.sizes, b.device
    denoise, scheduler_class, presets = synthetic_api()
    recipe = presets[sizes.unet]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as kd.synthetic generate
    unet = UNet2DModel(**recipe.unet).to(device).eval().to(dtype)
    config = DDPMScheduler(**recipe.noise).config

    def generate(name: str, steps: int, batch: int) -> float:
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        return batch / timed(lambda: denoise(unet, scheduler_class(name), config, steps, gens, device, dtype),
                             device)[1]

    generate("ddim", 2, sizes.gen_batch)  # warm-up
    variants = {f"{n}-{k}-{sizes.gen_batch}": (lambda n=n, k=k: generate(n, k, sizes.gen_batch))
                for n in ("ddpm", "ddim", "dpm") for k in sizes.gen_steps}
    if sizes.gen_big_batch:
        generate("ddim", 2, sizes.gen_big_batch)
        variants[f"ddim-{sizes.pool_steps}-{sizes.gen_big_batch}"] = (
            lambda: generate("ddim", sizes.pool_steps, sizes.gen_big_batch))
    s = interleave(variants, sizes.gen_rounds)
    side = recipe.unet["sample_size"]
    for name, v in s.items():
        sched, steps, batch = name.split("-")
        b.add(note(f"synthetic {sched}, {steps} steps", f"{statistics.median(v):.1f} img/s",
                   f"{side} px, batch {batch}"))
    return {"samples_img_s": s, "unet": f"kd.generators.presets.PRESETS[{sizes.unet!r}]",
            "params": sum(p.numel() for p in unet.parameters()), "batch": sizes.gen_batch,
            "big_batch": sizes.gen_big_batch, "dtype": str(dtype), "timed": "kd.synthetic.denoise"}
