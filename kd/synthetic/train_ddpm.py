"""The DDPM job of the generator trainer: an unconditional diffusers UNet2DModel + DDPMScheduler with EMA
weights, exported as a diffusers pipeline folder (``OUT/pipeline``) and published as ``generator-{dataset}``."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from kd.checkpoint import load_state_tensors, state_tensors
from kd.generators.sampling import denoise, image_generators, scheduler_class, to_pixels
from kd.io import sha256_file


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class DdpmJob:
    export_dir = "pipeline"
    batches_per_step = 1

    def __init__(self, cfg):
        self.cfg, self.recipe = cfg, cfg.recipe()
        self.channels = self.recipe.unet["in_channels"]
        self.lr = 0.0

    def auto_precision(self, cuda: bool) -> str:
        return "bf16" if cuda else "no"

    def total_steps(self, per_epoch: int) -> int:
        return self.recipe.epochs * per_epoch

    def build(self) -> None:
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.training_utils import EMAModel

        r = self.recipe
        self.unet = UNet2DModel(**r.unet)
        self.noise = DDPMScheduler(**r.noise)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=r.lr, weight_decay=0.0)
        self.ema = EMAModel(self.unet.parameters(), decay=r.ema_decay, use_ema_warmup=True, power=r.ema_power,
                            model_cls=UNet2DModel, model_config=self.unet.config)
        self.raw = self.unet

    def n_params(self) -> int:
        return sum(p.numel() for p in self.raw.parameters())

    def state(self) -> tuple[dict, dict]:
        """UNet + optimizer (:func:`kd.checkpoint.state_tensors`), the EMA weights as ``ema.{i}``."""
        tensors, info = state_tensors(self.raw, self.optimizer)
        tensors.update({f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)})
        info["ema"] = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        return tensors, info

    def load(self, tensors: dict, info: dict) -> None:
        load_state_tensors(tensors, info, self.raw, self.optimizer)
        shadow = [tensors[f"ema.{i}"] for i in range(len(self.ema.shadow_params))]
        self.ema.load_state_dict({**info["ema"], "shadow_params": shadow})

    def prepare(self, acc) -> None:
        self.unet, self.optimizer = acc.prepare(self.unet, self.optimizer)
        self.ema.to(acc.device)
        self.raw = acc.unwrap_model(self.unet)
        self.unet.train()

    def step(self, step: int, batches, g: torch.Generator, acc, total: int) -> dict:
        """One denoising step on batch ``step``: flips, noise and timesteps drawn from ``g``."""
        r = self.recipe
        clean = batches(step)
        if r.flip:
            flip = torch.rand(clean.shape[0], generator=g, device=clean.device) < 0.5
            clean = torch.where(flip[:, None, None, None], clean.flip(-1), clean)
        noise = torch.randn(clean.shape, generator=g, device=clean.device)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (clean.shape[0],), generator=g,
                          device=clean.device)
        noisy = self.noise.add_noise(clean, noise, t)
        self.lr = lr_at(step, total, r.lr, r.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        with acc.autocast():
            loss = F.mse_loss(self.unet(noisy, t).sample.float(), noise)
        acc.backward(loss)
        acc.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.raw.parameters())
        return {"generator/loss": loss.item()}

    def extras(self) -> dict:
        return {"generator/lr": self.lr, "generator/ema_decay": self.ema.cur_decay_value}

    @torch.no_grad()
    def grid(self, n: int, device) -> torch.Tensor:
        """``n`` images of the EMA weights (DDIM, the preset's sample steps); the training weights come back."""
        self.ema.store(self.raw.parameters())
        self.ema.copy_to(self.raw.parameters())
        self.raw.eval()
        try:
            size = self.recipe.unet["sample_size"]
            x = denoise(self.raw, scheduler_class("ddim"), self.noise.config, self.recipe.sample_steps,
                        image_generators(range(n), "grid"), device)
            return to_pixels(x, size, size)
        finally:
            self.raw.train()
            self.ema.restore(self.raw.parameters())

    def export(self, out: Path) -> tuple[list[Path], dict]:
        """DDPMPipeline(unet=EMA weights) saved to ``out/pipeline`` (swapped in whole, never half-written)."""
        from diffusers import DDPMPipeline, UNet2DModel

        unet = UNet2DModel.from_config(self.raw.config)
        self.ema.copy_to(unet.parameters())
        tmp, final, old = out / ".pipeline-incoming", out / "pipeline", out / ".pipeline-old"
        for p in (tmp, old):
            shutil.rmtree(p, ignore_errors=True)
        DDPMPipeline(unet=unet.to("cpu"), scheduler=self.noise).save_pretrained(str(tmp))
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        files = [final / "unet" / "diffusion_pytorch_model.safetensors", final / "model_index.json",
                 final / "unet" / "config.json", final / "scheduler" / "scheduler_config.json"]
        return files, {"sample_size": self.recipe.unet["sample_size"], "weights_sha256": sha256_file(files[0])}
