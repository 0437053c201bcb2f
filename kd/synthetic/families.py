"""Generator families, one registry: what ``train --generator=NAME`` fits and what ``generate --model=M`` samples.

A :class:`Family` is one entry: its recipes (presets), the job that trains it (a :class:`GeneratorJob`, run by
the one generator trainer, :mod:`kd.synthetic.trainer`) and the ``train`` settings only it takes;
:func:`register_family` adds one, and the choices of ``--generator`` and the trainer follow. How a folder it
exported is recognised and sampled is its sampler kind, below the stages (:func:`kd.generators.register_sampler`):
pools and students both sample it.

* ``ddpm``: an unconditional diffusers UNet + DDPMScheduler (:mod:`kd.synthetic.train_ddpm`).
* ``sngan``: the paper's SN-GAN (:mod:`kd.synthetic.train_gan`, :mod:`kd.generators.sngan`).
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


@dataclass(frozen=True)
class Family:
    name: str
    help: str
    presets: Callable[[], dict]  # preset name -> recipe
    default_preset: Callable[[str], str]  # a dataset's recipe family (kd.datasets) -> the preset --preset="" means
    job: Callable[[object], GeneratorJob]  # GeneratorTrainConfig -> its job
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


def _presets(kind: str) -> Callable[[], dict]:
    def get() -> dict:
        from kd.generators.presets import presets_of

        return presets_of(kind)

    return get


def _default(kind: str) -> Callable[[str], str]:
    def get(dataset: str) -> str:
        from kd.generators.presets import default_preset

        return default_preset(kind, dataset)

    return get


def _ddpm_job(cfg):
    from kd.synthetic.train_ddpm import DdpmJob

    return DdpmJob(cfg)


def _gan_job(cfg):
    from kd.synthetic.train_gan import GanJob

    return GanJob(cfg)


register_family(Family("ddpm", "an unconditional diffusion model (diffusers)", _presets("ddpm"), _default("ddpm"),
                       _ddpm_job, settings=("epochs",)))
register_family(Family("sngan", "the paper's SN-GAN", _presets("sngan"), _default("sngan"), _gan_job,
                       settings=("g_steps", "n_dis", "snapshots")))
