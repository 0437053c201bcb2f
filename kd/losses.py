"""The distillation losses, one registry: a loss is a function and one entry (``--loss`` chooses it).

A loss maps (student logits ``[B, C]``, the batch, the run's config) to a scalar. The batch holds ``target``
(the teacher's logits or log-probabilities, ``[B, C]``), ``y`` (the labels of the real rows, -1 on synthetic
rows: a generator's images have none) and ``tau`` (each row's temperature, ``[B]``, or absent: the config's
``temperature`` for every row). :func:`register_loss` adds one, naming the config fields it reads beyond the
batch (its ``params``: a flag no chosen loss reads is refused when set); the config's ``--loss`` choices, its run
names and the report's groups follow (:mod:`kd.config`).

* ``kd`` (the default): Eq. 1 of Stanton et al., no label term.
* ``kd_nll``: ``(1 - alpha) * Eq. 1 + alpha * cross-entropy of the labels`` on the real rows (Hinton et al.'s
  mix; the paper sets alpha to 0, where it is ``kd`` exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Loss:
    fn: Callable  # (student_logits, batch, cfg) -> scalar tensor
    help: str
    params: tuple[str, ...] = ()  # the config fields it reads (beyond the temperature)

    def __call__(self, student_logits: torch.Tensor, batch: dict, cfg) -> torch.Tensor:
        return self.fn(student_logits, batch, cfg)


LOSSES: dict[str, Loss] = {}


def register_loss(name: str, help: str, params: tuple[str, ...] = ()):
    """Decorator: ``fn(student_logits, batch, cfg)`` becomes the loss ``name``, reading the config fields
    ``params``."""
    def add(fn: Callable) -> Callable:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered already")
        LOSSES[name] = Loss(fn, help, tuple(params))
        return fn

    return add


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """-tau^2 * sum_j softmax(z_t/tau)_j * log softmax(z_s/tau)_j, averaged over the batch (Eq. 1).

    ``teacher_logits`` may be logits or log-probabilities (e.g. :func:`kd.models.ensemble_log_probs`):
    softmax is shift-invariant, so both give the same loss. ``temperature``: one for every row, or a tensor
    ``[B]`` of each row's (the authors' online synthetic rows have their own). No label term (alpha = 0).
    """
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(temperature, dtype=torch.float32, device=student_logits.device)
    t = t[:, None] if t.dim() == 1 else t
    p_teacher = F.softmax(teacher_logits.float() / t, dim=-1)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    return -((t * t) * (p_teacher * log_p_student)).sum(-1).mean()


def _tau(batch: dict, cfg):
    return batch["tau"] if batch.get("tau") is not None else cfg.temperature


@register_loss("kd", "Eq. 1: -tau^2 sum softmax(z_t/tau) log softmax(z_s/tau), no label term (the paper's)")
def _kd(student_logits: torch.Tensor, batch: dict, cfg) -> torch.Tensor:
    return kd_loss(student_logits, batch["target"], _tau(batch, cfg))


@register_loss("kd_nll", "(1 - alpha) x Eq. 1 + alpha x cross-entropy of the labels on the real rows", ("alpha",))
def _kd_nll(student_logits: torch.Tensor, batch: dict, cfg) -> torch.Tensor:
    import torch.nn.functional as F

    soft = kd_loss(student_logits, batch["target"], _tau(batch, cfg))
    y = batch["y"]
    real = y >= 0  # a generator's images have no label
    hard = F.cross_entropy(student_logits[real].float(), y[real]) if bool(real.any()) else soft * 0
    return (1 - cfg.alpha) * soft + cfg.alpha * hard
