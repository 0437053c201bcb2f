"""A run's optimizer and learning-rate schedule, built in one visible place: the entry points call :func:`optimizer`,
the training loop asks :func:`lr_at` for each epoch's rate. Each is a registry entry (``--optimizer``,
``--schedule``): a new one is a function and one entry.

* ``sgd`` (the paper's): SGD with momentum, Nesterov where ``--nesterov`` (and momentum > 0), weight decay on
  every parameter (BatchNorm's included, as the authors' code decays them). Parameters on CUDA take torch's
  fused kernel (one launch for every parameter); elsewhere torch's default (foreach where it applies).
* ``cosine`` (the paper's): cosine annealing stepped once per epoch, ``lr`` at epoch 0 and ``eta_min`` after the
  last.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _sgd(params: Iterable, cfg) -> torch.optim.Optimizer:
    import torch

    params = list(params)
    fused = bool(params) and all(_tensor(p).is_cuda for p in params)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay, fused=fused or None)


def _tensor(p):
    """A parameter, or the first of a parameter group's."""
    return p["params"][0] if isinstance(p, dict) else p


def cosine_lr(epoch: int, epochs: int, lr: float, eta_min: float) -> float:
    """Cosine annealing stepped once per epoch (epoch is 0-based): lr at epoch 0, eta_min after the last."""
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


OPTIMIZERS: dict[str, Callable] = {"sgd": _sgd}
SCHEDULES: dict[str, Callable] = {"cosine": lambda epoch, cfg: cosine_lr(epoch, cfg.epochs, cfg.lr, cfg.eta_min)}


def optimizer(params: Iterable, cfg) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, over ``params``, with the run's hyperparameters."""
    return OPTIMIZERS[cfg.optimizer](params, cfg)


def lr_at(epoch: int, cfg) -> float:
    """The learning rate of (0-based) ``epoch`` under the schedule ``cfg.schedule`` names."""
    return SCHEDULES[cfg.schedule](epoch, cfg)
