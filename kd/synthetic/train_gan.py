"""The SN-GAN job of the generator trainer (the paper's generator): n_dis hinge-loss D steps per G step, Adam,
an optional EMA copy of G; exported as ``OUT/generator/`` (generator.safetensors + generator.json) and published
as ``generator-{dataset}-sngan``."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from kd.checkpoint import load_state_tensors, state_tensors
from kd.io import sha256_file
from kd.synthetic import sngan
from kd.synthetic.sampling import image_generators, to_pixels


class GanJob:
    export_dir = "generator"

    def __init__(self, cfg):
        self.cfg, self.recipe = cfg, cfg.recipe()
        self.channels, self.batches_per_step = self.recipe.channels, self.recipe.n_dis

    def auto_precision(self, cuda: bool) -> str:
        return "no"  # a 4M-parameter G: fp32 (spectral norm's power iteration stays exact)

    def total_steps(self, per_epoch: int) -> int:
        return self.recipe.g_steps

    def build(self) -> None:
        self.g, self.d = sngan.build_gan(self.recipe)
        self.opt_g, self.opt_d = sngan.optimizers(self.recipe, self.g, self.d)
        self.ema = copy.deepcopy(self.g) if self.recipe.ema_decay > 0 else None
        self.raw_g, self.raw_d = self.g, self.d

    def n_params(self) -> int:
        return sum(p.numel() for p in self.raw_g.parameters())

    def _parts(self):
        return {"g": (self.raw_g, self.opt_g), "d": (self.raw_d, self.opt_d)}

    def state(self) -> tuple[dict, dict]:
        """G and D with their optimizers (:func:`kd.checkpoint.pack`, prefixed ``g.`` / ``d.``), the EMA G."""
        tensors, info = {}, {}
        for name, (model, opt) in self._parts().items():
            t, info[name] = state_tensors(model, opt)
            tensors.update({f"{name}.{k}": v for k, v in t.items()})
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        return tensors, info

    def load(self, tensors: dict, info: dict) -> None:
        for name, (model, opt) in self._parts().items():
            part = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
            load_state_tensors(part, info[name], model, opt)
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})

    def prepare(self, acc) -> None:
        self.g, self.d, self.opt_g, self.opt_d = acc.prepare(self.g, self.d, self.opt_g, self.opt_d)
        self.raw_g, self.raw_d = acc.unwrap_model(self.g), acc.unwrap_model(self.d)
        if self.ema is not None:
            self.ema.to(acc.device)

    def step(self, step: int, batches, g: torch.Generator, acc, total: int) -> dict:
        """n_dis D steps on batches step * n_dis + j, then one G step; latents drawn from ``g``."""
        n = self.recipe.n_dis
        reals = [batches(step * n + j) for j in range(n)]
        with acc.autocast():
            d_loss, g_loss = sngan.train_step(self.g, self.d, self.opt_g, self.opt_d, reals, generator=g,
                                              z_dim=self.recipe.z_dim, backward=acc.backward)
        if self.ema is not None:
            sngan.ema_update(self.ema, self.raw_g, self.recipe.ema_decay)
        return {"generator/d_loss": d_loss, "generator/g_loss": g_loss}

    def extras(self) -> dict:
        return {"generator/lr": self.opt_g.param_groups[0]["lr"]}

    def sampled(self) -> sngan.Generator:
        """The G that is sampled and exported: the EMA copy where there is one."""
        return self.ema if self.ema is not None else self.raw_g

    @torch.no_grad()
    def grid(self, n: int, device) -> torch.Tensor:
        z = torch.stack([torch.randn(self.recipe.z_dim, generator=g) for g in image_generators(range(n), "grid")])
        size = self.recipe.image_size
        return to_pixels(sngan.sample(self.sampled(), z.to(device)).float().cpu(), size, size)

    def export(self, out: Path) -> tuple[list[Path], dict]:
        g = copy.deepcopy(self.sampled()).to("cpu")
        meta = {"sample_size": self.recipe.image_size, "ema": self.ema is not None}
        files = sngan.save_generator(out / self.export_dir, g, self.recipe, meta)
        return files, {**meta, "weights_sha256": sha256_file(files[0])}
