"""The two samplers (:class:`kd.generators.Sampler`): a diffusion pipeline and an SN-GAN.

:func:`kd.generators.load_sampler` picks one for what ``--model`` names: a ``generator.json`` with ``"kind":
"sngan"`` beside safetensors weights is an SN-GAN (:func:`kd.generators.sngan.save_generator` writes it); anything
else is a diffusers DDPM pipeline. A sampler maps
image ids to float images in [-1, 1]; image ``i``'s noise (the diffusion's, or the GAN's latent) comes from
``derived_seed(seed, i)`` only, so every pool is bit-identical per seed. ``--step=N`` picks an SN-GAN's snapshot
at G step N (:func:`kd.generators.sngan.generator_json`) instead of its final weights.
"""

from __future__ import annotations

import torch

from kd.errors import KDError
from kd.generators import sngan
from kd.generators.sampling import denoise, image_generators, model_fingerprint, scheduler_class

DEFAULT_STEPS = {"ddim": 100, "dpm": 25}  # ddpm: all of the model's training timesteps


class DiffusionSampler:
    """A DDPM pipeline's UNet run through ``scheduler`` for ``steps`` steps."""

    kind = "ddpm"

    def __init__(self, pipe, scheduler: str, steps: str, device: torch.device):
        self.unet, self.config = pipe.unet, pipe.scheduler.config
        train_steps = int(self.config.get("num_train_timesteps", 1000))
        self.steps = int(steps) if steps != "auto" else DEFAULT_STEPS.get(scheduler, train_steps)
        if self.steps > train_steps:
            raise KDError(f"--steps={self.steps} exceeds the model's {train_steps} training timesteps")
        self.scheduler, self.device = scheduler, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.fingerprint = model_fingerprint(self.unet, self.config)
        self.unet = self.unet.to(device).eval()
        if self.dtype != torch.float32:
            self.unet = self.unet.to(self.dtype)
        self.sched_cls = scheduler_class(scheduler)

    def identity(self) -> dict:
        """What decides the images (a shard made under another identity is not reused)."""
        return {"model_sha256": self.fingerprint, "scheduler": self.scheduler, "steps": self.steps,
                "device": self.device.type, "dtype": str(self.dtype).removeprefix("torch.")}

    def describe(self) -> str:
        return f"{self.scheduler} {self.steps} steps"

    def __call__(self, ids, seed: int) -> torch.Tensor:
        gens = image_generators(ids, seed)
        return denoise(self.unet, self.sched_cls, self.config, self.steps, gens, self.device, self.dtype)


class GanSampler:
    """An SN-GAN generator in eval mode (BN running statistics), float32; one forward pass per batch."""

    kind = "sngan"

    def __init__(self, folder, device: torch.device, step: int = 0):
        self.g, self.info = sngan.load_generator(folder, step=step)
        self.fingerprint = model_fingerprint(self.g)
        self.g, self.device = self.g.to(device), device
        self.step = self.info.get("step")  # the G step of these weights (None: exported before steps were kept)

    def identity(self) -> dict:
        return {"model_sha256": self.fingerprint, "generator": "sngan", "device": self.device.type,
                "dtype": "float32"}

    def describe(self) -> str:
        at = f" at G step {self.step}" if self.step is not None else ""
        return f"SN-GAN{at} (z {self.g.z_dim}, one forward pass)"

    def __call__(self, ids, seed: int) -> torch.Tensor:
        z = torch.stack([torch.randn(self.g.z_dim, generator=g) for g in image_generators(ids, seed)])
        return sngan.sample(self.g, z.to(self.device)).float().cpu()
