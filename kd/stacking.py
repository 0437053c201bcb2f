"""m models of one architecture as one stacked model: the same numbers as m separate models, fewer launches.

The members of a sweep's grid differ in seed, teachers or temperature, not in shape, so their weights stack:
:class:`StackedModel` holds every parameter and buffer as one tensor ``[m, *shape]`` (``torch.func.stack_module_state``)
and runs ``torch.func.functional_call`` under ``torch.vmap`` over the member dimension. The input is ``[m, B, ...]``,
each member its own batch, the output ``[m, B, C]``; vmap turns each convolution into one grouped convolution
over the m members, so one step launches the kernels of one network instead of m.

* Training mode is BatchNorm's: each member normalises with its own batch statistics and updates its own
  running statistics (the stacked buffers, updated in place under vmap).
* Gradients: the sum of the members' losses is backpropagated once; member i's slice of a stacked gradient
  is the gradient of its own loss (the members share nothing).
* An optimizer whose update is elementwise (SGD with momentum, Nesterov and weight decay, as the engine's)
  over the stacked tensors is m optimizers with the same hyperparameters: :func:`stack_optimizer` builds it
  from the members' optimizers (their states stacked), :meth:`StackedModel.unstack_into` writes weights, buffers
  and optimizer states back into m ordinary models and optimizers, so checkpoints, evaluation and published
  weights stay the plain path's (:mod:`kd.checkpoint`).

The results equal separate models up to float rounding (a grouped convolution sums in another order);
tests/test_packing.py checks a step to 1e-5 and whole distillation runs against ``distill.py``. The training step
that uses it is :class:`kd.steppers.StackedStep`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state


class StackedModel:
    """The stacked weights of m models of one architecture; ``stacked(x)`` maps ``[m, B, ...]`` to ``[m, B, C]``."""

    def __init__(self, models: list[nn.Module]):
        if not models:
            raise ValueError("a stack needs at least one model")
        shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in models]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("only models of one architecture (the same state_dict keys and shapes) stack")
        self.m = len(models)
        params, buffers = stack_module_state(models)  # fresh leaf tensors: the models are not touched
        self.params: dict[str, torch.Tensor] = params
        self.buffers: dict[str, torch.Tensor] = buffers
        self.keys = list(shapes[0])  # state_dict order (parameters and persistent buffers)
        self.base = copy.deepcopy(models[0]).to("meta")  # the structure only; functional_call supplies weights
        self.base.train(models[0].training)

    @property
    def training(self) -> bool:
        return self.base.training

    def train(self, mode: bool = True) -> StackedModel:
        self.base.train(mode)
        return self

    def eval(self) -> StackedModel:
        return self.train(False)

    def parameters(self) -> list[torch.Tensor]:
        """The stacked parameters, in the members' ``parameters()`` order (optimizer state index i = parameter i)."""
        return list(self.params.values())

    def _one(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.m:
            raise ValueError(f"expected inputs [m={self.m}, B, ...], got {tuple(x.shape)}")
        return torch.vmap(self._one)(self.params, self.buffers, x)

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's ordinary ``state_dict`` (copies)."""
        both = {**self.params, **self.buffers}
        return {k: both[k][i].detach().clone() for k in self.keys}

    def unstack_into(self, models: list[nn.Module], optimizers: list | None = None,
                     optimizer: torch.optim.Optimizer | None = None) -> None:
        """Write member i's weights and buffers into ``models[i]`` and, given the stacked ``optimizer``, its
        optimizer state into ``optimizers[i]``."""
        if len(models) != self.m:
            raise ValueError(f"{len(models)} models for a stack of {self.m}")
        for i, model in enumerate(models):
            model.load_state_dict(self.state_dict(i))
        if optimizer is not None:
            stacked = optimizer.state_dict()
            for i, opt in enumerate(optimizers or []):
                opt.load_state_dict(member_optimizer_state(stacked, i, self.parameters()))


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def stack_optimizer(stacked: StackedModel, optimizers: list[torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """One optimizer of the members' class and hyperparameters over the stacked parameters, its state the
    members' states stacked (an optimizer with no state yet, e.g. before the first step, stays so)."""
    if len(optimizers) != stacked.m:
        raise ValueError(f"{len(optimizers)} optimizers for a stack of {stacked.m}")
    states = [o.state_dict() for o in optimizers]
    groups = [s["param_groups"] for s in states]
    if len(groups[0]) != 1 or any([_hyper(g) for g in gs] != [_hyper(groups[0][0])] for gs in groups):
        raise ValueError("the members' optimizers must have one parameter group with the same hyperparameters")
    opt = type(optimizers[0])(stacked.parameters(), **_hyper(groups[0][0]))
    opt.load_state_dict({"state": stack_optimizer_states([s["state"] for s in states], stacked.parameters()),
                         "param_groups": [{**groups[0][0], "params": list(range(len(stacked.params)))}]})
    return opt


def stack_optimizer_states(states: list[dict], params: list[torch.Tensor]) -> dict:
    """Per-parameter optimizer states of m members stacked: a tensor of the parameter's shape becomes
    ``[m, *shape]``; anything else (a step count) must be the same for every member and is kept once."""
    indices = set(states[0])
    if any(set(s) != indices for s in states[1:]):
        raise ValueError("the members' optimizers have state for different parameters (stepped differently?)")
    out: dict = {}
    for idx in sorted(indices):
        entry = {}
        for key, first in states[0][idx].items():
            values = [s[idx][key] for s in states]
            if torch.is_tensor(first) and tuple(first.shape) == tuple(params[idx].shape[1:]):
                entry[key] = torch.stack([v.detach() for v in values])
            elif all(_same(v, first) for v in values[1:]):
                entry[key] = first
            else:
                raise ValueError(f"optimizer state {key!r} of parameter {idx} differs between the members")
        out[idx] = entry
    return out


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def member_optimizer_state(stacked_state: dict, i: int, params: list[torch.Tensor]) -> dict:
    """Member i's optimizer ``state_dict`` from the stacked optimizer's (the inverse of stacking)."""
    state = {}
    for idx, entry in stacked_state["state"].items():
        state[idx] = {k: v[i].clone() if torch.is_tensor(v) and v.dim() == params[idx].dim() else v
                      for k, v in entry.items()}
    return {"state": state, "param_groups": copy.deepcopy(stacked_state["param_groups"])}
