"""How a group of models takes one training step: the part of the loop in which a plain run and a pack differ.

The engine's loop (:func:`kd.engine.fit`) trains a group of runs that stand at the same position; a plain run is
a group of one. A :class:`Stepper` maps the group's batches to their logits and applies the optimizer step:

* :class:`LoopedStep`: the members one after another, each through its own forward (compiled or not) and
  optimizer: for one member exactly the plain loop; for several, bitwise the numbers of separate runs, and the
  faster way on CPUs (where a fused step costs more than it saves);
* :class:`FusedStep`: the members (PreResNets of one depth) as one :class:`~kd.fused.FusedPreResNet` with one
  fused SGD: one network's kernel launches per step instead of m, the lever on accelerators; equal to separate
  runs up to float rounding (a grouped convolution sums in another order).

Both are siblings under the one :class:`Stepper` protocol; neither is a variant of the other.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kd.fused import FusedPreResNet, fuse_optimizer, unfuse_optimizer_into


class Stepper(Protocol):
    def set_lr(self, lr: float) -> None: ...

    def train(self) -> None: ...

    def __call__(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Member i's logits for its batch ``xs[i]``."""

    def step(self) -> None:
        """One optimizer step of every member (after the backward pass); gradients cleared."""

    def close(self) -> None:
        """The members' own models and optimizers hold the current state (before a checkpoint or evaluation)."""


def _channels_last(x: torch.Tensor, on: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if on else x


class LoopedStep:
    """The members one by one: ``forwards[i]`` (the model, or its compiled forward) and ``optimizers[i]``."""

    def __init__(self, models: list, optimizers: list, forwards: list | None = None, channels_last: bool = False):
        self.models, self.optimizers = models, optimizers
        self.forwards, self.channels_last = forwards or models, channels_last

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr

    def train(self) -> None:
        for model in self.models:
            model.train()

    def __call__(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [fwd(_channels_last(x, self.channels_last)) for fwd, x in zip(self.forwards, xs)]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass  # the members' own models and optimizers were stepped


class FusedStep:
    """m PreResNets and their SGDs trained as one :class:`FusedPreResNet` with one fused SGD; the members' own
    models and optimizers are not touched until :meth:`close` writes weights, BatchNorm buffers, the learning
    rate and momentum buffers back into them (so checkpoints and evaluation read the members' own)."""

    def __init__(self, models: list, optimizers: list):
        self.models = models
        # the optimizers Accelerate wraps: their own state is what a checkpoint holds
        self.optimizers = [getattr(o, "optimizer", o) for o in optimizers]
        self.fused = FusedPreResNet.from_members(models)
        self.optimizer = fuse_optimizer(self.fused, models, self.optimizers)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def train(self) -> None:
        self.fused.train()

    def __call__(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.fused(xs).unbind(0))

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.fused.to_members(self.models)
        unfuse_optimizer_into(self.fused, self.optimizer, self.models, self.optimizers)
