"""The SN-GAN job of the generator trainer (the paper's generator): n_dis hinge-loss D steps per G step (on n_dis
real batches, or all on one where the preset says ``same_real``), Adam with the preset's linear learning-rate decay
or constant rate (logged as ``generator/lr``), optional horizontal flips, an optional
EMA copy of G; exported as ``OUT/generator/`` (generator.safetensors + generator.json) and published as
``generator-{dataset}-sngan`` (``-{preset}`` appended for a preset other than the dataset's default).

Snapshots: at each step of ``--snapshots`` (default: the preset's) the sampled G is also written to
``OUT/generator/generator-step{step:08d}.safetensors`` + ``.json`` as the run passes that step; they are published
with the final G in the same artifact, and ``generate --step=N`` samples one, so a single training gives pools
of several sample qualities. A snapshot records the run's identity; one made under another identity (an old run
in the same folder) is deleted when training starts, so every snapshot beside the final G is of the same run.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from kd.checkpoint import load_state_tensors, state_tensors
from kd.generators import sngan
from kd.generators.sampling import image_generators, to_pixels
from kd.io import GENERATOR, read_json, sha256_file


class GanJob:
    export_dir = "generator"

    def __init__(self, cfg):
        self.cfg, self.recipe = cfg, cfg.recipe()
        self.channels = self.recipe.channels
        self.batches_per_step = 1 if self.recipe.same_real else self.recipe.n_dis
        self.snapshots = set(cfg.snapshot_steps())
        self.identity = json.loads(json.dumps(cfg.identity()))  # as the trainer compares it (tuples -> lists)
        self.folder = cfg.out_dir() / self.export_dir
        self.at = 0  # the G steps done

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
        """G and D with their optimizers (:func:`kd.checkpoint.state_tensors`, prefixed ``g.`` / ``d.``), the EMA G."""
        tensors, info = {}, {}
        for name, (model, opt) in self._parts().items():
            t, info[name] = state_tensors(model, opt)
            tensors.update({f"{name}.{k}": v for k, v in t.items()})
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        return tensors, info

    def load(self, tensors: dict, info: dict) -> None:
        self.at = int(info.get("step", 0))
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
        if acc.is_main_process:
            self._drop_foreign_snapshots()

    def step(self, step: int, batches, g: torch.Generator, acc, total: int) -> dict:
        """n_dis D steps on batches step * n_dis + j (``same_real``: all on batch ``step``, flipped once) and one
        G step (G first where the preset says so), at the learning rate of G step ``step``; flips and latents
        drawn from ``g``. Passing a snapshot step writes it."""
        r, n = self.recipe, self.recipe.n_dis
        reals = [batches(step)] if r.same_real else [batches(step * n + j) for j in range(n)]
        if r.flip:
            reals = [_flip(x, g) for x in reals]
        if r.same_real:
            reals = reals * n
        sngan.set_lr(sngan.lr_at(step, total, r.lr, r.lr_end), self.opt_g, self.opt_d)
        with acc.autocast():
            d_loss, g_loss = sngan.train_step(self.g, self.d, self.opt_g, self.opt_d, reals, generator=g,
                                              z_dim=r.z_dim, backward=acc.backward, g_first=r.g_first)
        if self.ema is not None:
            sngan.ema_update(self.ema, self.raw_g, r.ema_decay)
        self.at = step + 1
        if self.at in self.snapshots and acc.is_main_process:
            self._save(self.folder, sngan.snapshot_stem(self.at))
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

    def _meta(self) -> dict:
        return {"sample_size": self.recipe.image_size, "ema": self.ema is not None, "step": self.at,
                "identity": self.identity}

    def _save(self, folder: Path, stem: str) -> list[Path]:
        g = copy.deepcopy(self.sampled()).to("cpu")
        return sngan.save_generator(folder, g, self.recipe, self._meta(), stem=stem)

    def _drop_foreign_snapshots(self) -> None:
        """Delete the snapshots of another run (another identity) left in the export folder."""
        dropped = []
        for s in sngan.snapshot_steps(self.folder):
            info = self.folder / f"{sngan.snapshot_stem(s)}.json"
            if read_json(info, GENERATOR).get("identity") != self.identity:
                for path in (info, info.with_suffix(".safetensors")):
                    path.unlink(missing_ok=True)
                dropped.append(s)
        if dropped:
            print(f"deleted the generator snapshots of another run in {self.folder} (steps "
                  f"{', '.join(map(str, dropped))})", file=sys.stderr)

    def export(self, out: Path) -> tuple[list[Path], dict]:
        """The final G, then the snapshots this run passed (weights + JSON each); the metadata lists their steps."""
        folder = out / self.export_dir
        files = self._save(folder, "generator")
        steps = [s for s in sngan.snapshot_steps(folder) if s < self.at]
        for s in steps:
            stem = folder / sngan.snapshot_stem(s)
            files += [stem.with_suffix(".safetensors"), stem.with_suffix(".json")]
        meta = {"sample_size": self.recipe.image_size, "ema": self.ema is not None, "snapshots": steps}
        return files, {**meta, "weights_sha256": sha256_file(files[0])}


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2 (torchvision's RandomHorizontalFlip), drawn from ``g``."""
    flip = torch.rand(x.shape[0], generator=g, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
