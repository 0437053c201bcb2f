"""Generator families, one registry: what ``train --generator=NAME`` fits and what ``generate --model=M`` samples.

A :class:`Family` is one entry: its recipes (presets), the job that trains it (a :class:`GeneratorJob`, run by
the one generator trainer, :mod:`kd.synthetic.trainer`), how a folder it exported is recognised and sampled (a
:class:`Sampler`), and the ``train`` settings only it takes. :func:`register_family` adds one; the choices of
``--generator``, the trainer, ``generate`` and the pools' metadata follow.

* ``ddpm``: an unconditional diffusers UNet + DDPMScheduler (:mod:`kd.synthetic.train_ddpm`); sampled with a
  diffusers scheduler. It is the fallback: any folder no other family recognises, or a Hugging Face hub id, is
  taken for a diffusers pipeline.
* ``sngan``: the paper's SN-GAN (:mod:`kd.synthetic.train_gan`, :mod:`kd.synthetic.sngan`); one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from kd.errors import KDError


class GeneratorJob(Protocol):
    """What the generator trainer needs of a family: its models, one training step, its state and its export."""

    export_dir: str  # the export's folder inside the run folder
    channels: int  # image channels it trains on
    batches_per_step: int  # real batches one step consumes
    recipe: object  # the resolved preset

    def auto_precision(self, cuda: bool) -> str:
        """``--mixed_precision=auto``: no, bf16 or fp16."""

    def total_steps(self, batches_per_epoch: int) -> int: ...

    def build(self) -> None:
        """The models and optimizers, freshly initialised (the trainer seeds first)."""

    def n_params(self) -> int: ...

    def state(self) -> tuple[dict, dict]:
        """(tensors, JSON-able info) of a checkpoint; :meth:`load` is the inverse."""

    def load(self, tensors: dict, info: dict) -> None: ...

    def prepare(self, accelerator) -> None:
        """The models and optimizers through Accelerate."""

    def step(self, step: int, batches, generator: torch.Generator, accelerator, total: int) -> dict:
        """One training step (its randomness from ``generator``): {metric: float}."""

    def extras(self) -> dict:
        """Further values of a logged row (e.g. the learning rate)."""

    def grid(self, n: int, device) -> torch.Tensor:
        """``n`` uint8 sample images for the progress grid."""

    def export(self, out: Path) -> tuple[list[Path], dict]:
        """The export (weights first) in ``out / export_dir``, and its metadata."""


class Sampler(Protocol):
    """What ``generate`` samples from: image ids to float images in [-1, 1], image i from (seed, i) only."""

    kind: str  # the family's name
    device: torch.device

    def identity(self) -> dict:
        """What decides the images (a shard made under another identity is not reused): the model's sha256 and
        settings, and the ``device`` (its type) and ``dtype`` it samples on."""

    def describe(self) -> str: ...

    def __call__(self, ids, seed: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class Family:
    name: str
    help: str
    presets: Callable[[], dict]  # preset name -> recipe
    default_preset: Callable[[str], str]  # a dataset's recipe family (kd.datasets) -> the preset --preset="" means
    job: Callable[[object], GeneratorJob]  # GeneratorTrainConfig -> its job
    sampler: Callable[[Path, object, torch.device], Sampler]  # (export folder, GenerateConfig, device) -> sampler
    detect: Callable[[Path], Path | None] = lambda path: None  # the export folder at or in ``path``, if it is one
    settings: tuple[str, ...] = ()  # the ``train`` settings only this family takes


FAMILIES: dict[str, Family] = {}


def register_family(f: Family, replace: bool = False) -> Family:
    if f.name in FAMILIES and not replace:
        raise ValueError(f"generator family {f.name!r} is registered already")
    FAMILIES[f.name] = f
    return f


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise KDError(f"unknown generator {name!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


FALLBACK = "ddpm"  # what a folder no family recognises, or a hub id, is taken for


def _presets(kind: str) -> Callable[[], dict]:
    def get() -> dict:
        from kd.synthetic.presets import presets_of

        return presets_of(kind)

    return get


def _default(kind: str) -> Callable[[str], str]:
    def get(dataset: str) -> str:
        from kd.synthetic.presets import default_preset

        return default_preset(kind, dataset)

    return get


def _ddpm_job(cfg):
    from kd.synthetic.train_ddpm import DdpmJob

    return DdpmJob(cfg)


def _gan_job(cfg):
    from kd.synthetic.train_gan import GanJob

    return GanJob(cfg)


def _diffusion_sampler(path: Path, cfg, device: torch.device):
    from kd.synthetic.generators import DiffusionSampler
    from kd.synthetic.sampling import pipeline_at

    return DiffusionSampler(pipeline_at(path, cfg.model_ref(), cfg.dataset), cfg.scheduler, cfg.steps, device)


def _gan_sampler(path: Path, cfg, device: torch.device):
    from kd.synthetic.generators import GanSampler

    return GanSampler(path, device, cfg.step)


def _gan_folder(path: Path) -> Path | None:
    from kd.synthetic import sngan

    for folder in (path, path / "generator"):  # an export, or a trainer's run folder holding one
        if folder.exists() and sngan.is_generator_folder(folder):
            return folder
    return None


register_family(Family("ddpm", "an unconditional diffusion model (diffusers)", _presets("ddpm"), _default("ddpm"),
                       _ddpm_job, _diffusion_sampler, settings=("epochs",)))
register_family(Family("sngan", "the paper's SN-GAN", _presets("sngan"), _default("sngan"), _gan_job, _gan_sampler,
                       detect=_gan_folder, settings=("g_steps", "n_dis", "snapshots")))
