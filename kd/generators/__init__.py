"""Generators below the stages: the models and samplers that distillation and the synthetic stage share.

A pool is sampled by the synthetic stage (``python -m kd.synthetic generate``); a student samples its own images
from a generator (a draw of its own, :mod:`kd.student`); both load what ``--model`` names through
:func:`load_sampler`: the sampler kind (:data:`SAMPLERS`, one entry per generator family) that recognises what the
folder holds, else a diffusers DDPM pipeline (a folder or a hub id). A sampler maps image ids to float images in
[-1, 1], image ``i``'s noise from ``derived_seed(seed, i)`` only (:mod:`kd.generators.sampling`).

Modules: :mod:`.sngan` (the SN-GAN: G, D, losses, the exported generator's files), :mod:`.presets` (the DDPM and
SN-GAN recipes), :mod:`.sampling` (seeds, reverse diffusion, pixels, grids, what ``--model`` names),
:mod:`.samplers` (:class:`~kd.generators.samplers.DiffusionSampler`, :class:`~kd.generators.samplers.GanSampler`).
Training a generator is the synthetic stage's (:mod:`kd.synthetic.families`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kd.errors import KDError

if TYPE_CHECKING:
    import torch


class Sampler(Protocol):
    """What a generator is sampled through: image ids to float images in [-1, 1], image i from (seed, i) only."""

    kind: str  # the family's name
    device: torch.device

    def identity(self) -> dict:
        """What decides the images (a shard made under another identity is not reused): the model's sha256 and
        settings, and the ``device`` (its type) and ``dtype`` it samples on."""

    def describe(self) -> str: ...

    def __call__(self, ids, seed: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplerKind:
    name: str
    load: Callable  # (export folder or model reference, settings, device) -> Sampler
    detect: Callable[[Path], Path | None] = lambda path: None  # the export folder at or in ``path``, if it is one


SAMPLERS: dict[str, SamplerKind] = {}
FALLBACK = "ddpm"  # what a folder no kind recognises, or a hub id, is taken for


def register_sampler(kind: SamplerKind, replace: bool = False) -> SamplerKind:
    if kind.name in SAMPLERS and not replace:
        raise ValueError(f"sampler kind {kind.name!r} is registered already")
    SAMPLERS[kind.name] = kind
    return kind


def load_sampler(model: str, settings, device, store=None, run=None) -> Sampler:
    """The sampler for ``model`` (a folder, a generator artifact or a hub id); ``settings``: what a sampler reads
    (``dataset``; a diffusion model's ``scheduler`` and ``steps``; an SN-GAN's ``step``: a snapshot)."""
    from kd.generators.sampling import model_path

    path = model_path(model, store, run, settings.dataset)
    for kind in SAMPLERS.values():
        folder = kind.detect(path) if path.exists() else None
        if folder is not None:
            return kind.load(folder, settings, device)
    if getattr(settings, "step", 0):
        raise KDError(f"--step={settings.step} picks an SN-GAN snapshot, but {model} is not an SN-GAN generator: drop "
                      "--step (a diffusion model's sampler steps are --steps)")
    return SAMPLERS[FALLBACK].load(path, settings, device)


def load_generator(name: str | Path, *, store=None, device: str = "cpu", step: int = 0):
    """An SN-GAN generator (a generator artifact of the local store, or a folder holding ``generator.json``, e.g.
    an import or a trainer's output) as a torch module in eval mode that maps latents [N, z_dim] (z ~ N(0, I);
    128 on CIFAR) to images in [-1, 1] [N, C, H, W]; ``step``: a snapshot (0: the final G). Its
    ``generator.json`` (provenance included) is the module's ``info``."""
    from kd.generators import sngan
    from kd.generators.sampling import model_path

    path = model_path(str(name), store, None)
    for folder in (path, path / "generator"):
        if folder.is_dir() and sngan.is_generator_folder(folder):
            g, info = sngan.load_generator(folder, device, step)
            g.info = info
            return g.eval()
    raise KDError(f"{name} is not an SN-GAN generator (no generator.json of kind sngan in {path}): import the "
                  "authors' with `python -m kd.synthetic import --dataset=cifar100`, or train one with "
                  "`python -m kd.synthetic train --generator=sngan`")


def _diffusion(path: Path, settings, device):
    from kd.generators.samplers import DiffusionSampler
    from kd.generators.sampling import pipeline_at

    model = settings.model_ref() if hasattr(settings, "model_ref") else str(path)
    return DiffusionSampler(pipeline_at(path, model, settings.dataset), settings.scheduler, settings.steps, device)


def _gan(path: Path, settings, device):
    from kd.generators.samplers import GanSampler

    return GanSampler(path, device, getattr(settings, "step", 0))


def _gan_folder(path: Path) -> Path | None:
    from kd.generators import sngan

    for folder in (path, path / "generator"):  # an export, or a trainer's run folder holding one
        if folder.exists() and sngan.is_generator_folder(folder):
            return folder
    return None


register_sampler(SamplerKind("ddpm", _diffusion))
register_sampler(SamplerKind("sngan", _gan, _gan_folder))
