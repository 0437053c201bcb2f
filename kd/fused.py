"""k PreResNets of one shape as one wide network (horizontal fusion, the layout of HFTA, Wang et al. 2021).

:class:`FusedPreResNet` is k :class:`kd.models.PreResNet` s of one depth and class count side by side, built
from native modules only, so every layer is one kernel of the k-wide network:

* activations are ``[N, k*C, H, W]``: member i's channels are block i (``[N, k, C, H, W]`` viewed flat);
* every convolution (the 3x3 ones, the bottleneck's 1x1 ones and the 1x1 projection shortcuts) is one
  ``nn.Conv2d`` with ``groups=k`` and weight ``[k*Cout, Cin, kh, kw]`` (member i's rows ``i*Cout:(i+1)*Cout``);
* every BatchNorm is one native ``nn.BatchNorm2d(k*C)``: its weight, bias and running statistics are
  ``[k, C]`` viewed flat, its momentum and eps the members'; per channel, so member i normalises with its own
  batch statistics and updates its own running statistics; ``num_batches_tracked`` is one counter (the
  members' counts must agree);
* the head is ``torch.baddbmm`` over ``[k, N, C] x [k, C, classes]`` (weight ``[k, C, classes]``, bias
  ``[k, 1, classes]``: HFTA's ``Linear``).

The blocks are :mod:`kd.models`' own ``BasicBlock`` / ``Bottleneck`` holding fused layers, so the fused network
runs the members' forward code. Under autocast the layers are what a member's are: convolutions and the
head in the low-precision dtype, BatchNorm native (bf16 activations with float32 parameters), so the
activations stay in bf16 throughout. No Python loop over the members runs in ``forward``; it compiles
(``torch.compile(dynamic=False)``) as one graph.

``forward`` takes ``[k, B, 3, H, W]`` (each member its own batch) or a list of k ``[B, 3, H, W]`` batches and
returns ``[k, B, classes]``; :meth:`FusedPreResNet.fused_member_logits` takes one ``[B, 3, H, W]`` batch for
every member (a teacher ensemble): the stem is then one ungrouped convolution of the shared input with the
members' stacked filters, so the input is never copied k times.

Gradients: the sum of the members' losses backpropagated once gives member i's slice of every gradient as
the gradient of its own loss (the members share no weights). An elementwise optimizer (SGD with momentum,
Nesterov and weight decay, as the engine's) over the fused parameters is k optimizers with the same
hyperparameters: :func:`fuse_optimizer` and :func:`unfuse_optimizer_into` map the momentum buffers both ways.
:meth:`FusedPreResNet.from_members` and :meth:`FusedPreResNet.to_members` map weights and buffers, so
checkpoints, evaluation and published weights stay the members' own. The numbers are the members' up to the
order in which a grouped convolution sums (tests/test_fused.py: float64 to 1e-9 over 24 SGD steps; float32
and bf16 step by step within rounding bounds derived from the dtype).
Only PreResNets fuse: :func:`can_fuse` says whether an architecture does (timm models do not: loop them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KDError
from kd.models import PRERESNET, Bottleneck, PreResNet

Inputs = torch.Tensor | Sequence[torch.Tensor]


def can_fuse(arch: str) -> bool:
    """Whether runs of ``arch`` fuse into a :class:`FusedPreResNet`: ``preresnet{depth}`` do, ``timm:*`` do not
    (whether the depth is valid is :func:`kd.models.check_arch`'s to say)."""
    return bool(PRERESNET.match(arch))


def check_fusable(arch: str) -> None:
    if not can_fuse(arch):
        raise KDError(f"{arch!r} runs cannot be fused (only preresnet{{depth}} runs fuse): train them one after "
                      "another (the looped step) instead")


class FusedConv2d(nn.Conv2d):
    """k bias-free convolutions of one shape as one ``groups=k`` convolution, weight ``[k*Cout, Cin, kh, kw]``."""

    def __init__(self, k: int, member: nn.Conv2d, **factory):
        if member.groups != 1 or member.bias is not None or member.padding_mode != "zeros":
            raise ValueError("only bias-free, ungrouped, zero-padded member convolutions fuse")
        super().__init__(k * member.in_channels, k * member.out_channels, member.kernel_size, member.stride,
                         member.padding, member.dilation, groups=k, bias=False, **factory)
        self.k = k

    def init_members(self) -> None:
        """PreResNet's initialisation of every member: normal(0, sqrt(2 / (kh * kw * Cout)))."""
        fan = self.kernel_size[0] * self.kernel_size[1] * self.out_channels // self.k
        with torch.no_grad():
            self.weight.normal_(0, math.sqrt(2.0 / fan))

    def member_view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(0, (self.k, -1))

    def shared_input(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's convolution of the one input ``x`` ``[N, Cin, H, W]``: ``[N, k*Cout, H', W']``."""
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, groups=1)


class FusedBatchNorm2d(nn.BatchNorm2d):
    """k BatchNorms of C channels as one native ``BatchNorm2d(k*C)``; one ``num_batches_tracked``."""

    def __init__(self, k: int, member: nn.BatchNorm2d, **factory):
        if not (member.affine and member.track_running_stats):
            raise ValueError("only affine member BatchNorms that track running statistics fuse")
        super().__init__(k * member.num_features, member.eps, member.momentum, **factory)
        self.k = k

    def init_members(self) -> None:
        self.reset_parameters()  # weight 1, bias 0, running mean 0, variance 1, count 0

    def member_view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t.expand(self.k) if name == "num_batches_tracked" else t.unflatten(0, (self.k, -1))


class FusedLinear(nn.Module):
    """k linear layers as one ``baddbmm``: ``[N, k*C]`` -> ``[k, N, classes]``; weight ``[k, C, classes]``."""

    def __init__(self, k: int, member: nn.Linear, **factory):
        super().__init__()
        if member.bias is None:
            raise ValueError("only member linear layers with a bias fuse")
        self.k, self.in_features, self.out_features = k, member.in_features, member.out_features
        self.weight = nn.Parameter(torch.empty(k, member.in_features, member.out_features, **factory))
        self.bias = nn.Parameter(torch.empty(k, 1, member.out_features, **factory))

    def init_members(self) -> None:
        """nn.Linear's initialisation of every member: uniform(-1/sqrt(in), 1/sqrt(in)), weight and bias."""
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.unflatten(1, (self.k, self.in_features)).transpose(0, 1)  # [k, N, C], a view
        return torch.baddbmm(self.bias, h, self.weight)

    def member_view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2) if name == "weight" else t.squeeze(1)  # nn.Linear's [out, in] and [out]

    def extra_repr(self) -> str:
        return f"k={self.k}, in_features={self.in_features}, out_features={self.out_features}"


def _fused_leaf(module: nn.Module, k: int, factory: dict) -> nn.Module | None:
    if isinstance(module, nn.Conv2d):
        return FusedConv2d(k, module, **factory)
    if isinstance(module, nn.BatchNorm2d):
        return FusedBatchNorm2d(k, module, **factory)
    if isinstance(module, nn.Linear):
        return FusedLinear(k, module, **factory)
    if isinstance(module, (nn.Sequential, PreResNet)) or type(module).__module__ == "kd.models":
        return None  # a container (stage, block, the network)
    raise ValueError(f"no fused form of {type(module).__name__}")


def preresnet_shape(model: nn.Module) -> tuple[int, int]:
    """(depth, num_classes) of a :class:`kd.models.PreResNet`; a :class:`KDError` for anything else."""
    if type(model) is not PreResNet:
        raise KDError(f"only preresnet members fuse, not {type(model).__name__}: train such runs one after "
                      "another (the looped step) instead")
    bottleneck = isinstance(model.layer1[0], Bottleneck)
    return len(model.layer1) * (9 if bottleneck else 6) + 2, model.fc.out_features


class FusedPreResNet(nn.Module):
    """k PreResNets of one depth and class count as one network: ``[k, B, 3, H, W]`` -> ``[k, B, classes]``.

    Its ``state_dict`` has the members' keys (``conv1.weight``, ``layer1.0.bn1.running_mean``, ..., ``fc.bias``)
    with fused shapes; ``parameters()`` come in the members' order. A fresh one is initialised as k fresh
    PreResNets are (in distribution; ``init=False``: uninitialised); :meth:`from_members` copies k existing ones.
    """

    def __init__(self, depth: int, num_classes: int, k: int, device=None, dtype=None, init: bool = True):
        super().__init__()
        if k < 1:
            raise ValueError(f"a fused network needs at least one member, got k={k}")
        self.k, self.depth, self.num_classes = k, depth, num_classes
        template = PreResNet(depth, num_classes)  # the members' structure; its blocks are reused
        for name, module in list(template.named_modules()):
            fused = _fused_leaf(module, k, {"device": "meta", "dtype": dtype})
            if fused is not None:
                parent, _, attr = name.rpartition(".")
                setattr(template.get_submodule(parent), attr, fused)
        for name, child in template.named_children():  # conv1, layer1..3, bn, fc: the members' names
            self.add_module(name, child)
        self.to_empty(device=device or torch.get_default_device())
        prefixes = dict.fromkeys(key.rpartition(".")[0] for key in self.state_dict())
        self._owners = {prefix: self.get_submodule(prefix) for prefix in prefixes}  # the fused layers
        if init:  # else uninitialised memory, for load_members to fill
            for m in self._owners.values():
                m.init_members()

    # ------------------------------------------------------------------------------------------- forward

    def forward(self, x: Inputs) -> torch.Tensor:
        """Member i's logits for its own batch ``x[i]``: ``[k, B, 3, H, W]`` (or k ``[B, 3, H, W]``) ->
        ``[k, B, classes]``."""
        return self._trunk(self.conv1(self._fuse_input(x)))

    def fused_member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits for the one batch ``x`` ``[B, 3, H, W]``: ``[k, B, classes]``, what
        ``torch.stack([m(x) for m in members])`` computes; the input is read once, not copied k times."""
        if x.dim() != 4:
            raise ValueError(f"expected one batch [B, 3, H, W] for every member, got {tuple(x.shape)}")
        return self._trunk(self.conv1.shared_input(x))

    def _trunk(self, h: torch.Tensor) -> torch.Tensor:  # PreResNet.forward after the stem
        h = self.layer3(self.layer2(self.layer1(h)))
        h = F.relu(self.bn(h))
        return self.fc(h.mean((2, 3)))

    def _fuse_input(self, x: Inputs) -> torch.Tensor:
        """k batches -> ``[B, k*3, H, W]`` (member i's images in channels ``3i:3i+3``), one copy, in the stem
        weight's memory format."""
        if isinstance(x, (list, tuple)):
            if len(x) != self.k:
                raise ValueError(f"expected {self.k} batches, one a member, got {len(x)}")
            if len({tuple(t.shape) for t in x}) != 1:
                raise ValueError(f"the members' batches differ in shape: {[tuple(t.shape) for t in x]}")
            return torch.cat(list(x), dim=1)
        if x.dim() != 5 or x.shape[0] != self.k:
            raise ValueError(f"expected inputs [k={self.k}, B, 3, H, W], got {tuple(x.shape)}")
        k, b, c, h, w = x.shape
        if self.channels_last:
            return x.permute(1, 3, 4, 0, 2).reshape(b, h, w, k * c).permute(0, 3, 1, 2)
        return x.transpose(0, 1).reshape(b, k * c, h, w)

    @property
    def channels_last(self) -> bool:
        w = self.conv1.weight
        return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()

    # ------------------------------------------------------------------------- the members' weights

    @classmethod
    def from_members(cls, models: Sequence[nn.Module]) -> FusedPreResNet:
        """The k ``models`` (PreResNets of one depth and class count) as one fused network: their weights,
        running statistics and ``num_batches_tracked``, BatchNorm momentum and eps, dtype, device, memory
        format and training mode. The models are not touched."""
        if not models:
            raise ValueError("a fused network needs at least one member")
        shapes = {preresnet_shape(m) for m in models}
        if len(shapes) != 1:
            raise ValueError(f"only members of one depth and class count fuse, got (depth, classes) {shapes}")
        p = models[0].conv1.weight
        fused = cls(*shapes.pop(), len(models), device=p.device, dtype=p.dtype, init=False)
        fused.load_members(models)
        if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous():
            fused.to(memory_format=torch.channels_last)
        return fused.train(models[0].training)

    @torch.no_grad()
    def load_members(self, models: Sequence[nn.Module]) -> None:
        """Copy member i's weights and buffers into block i of every fused tensor."""
        if len(models) != self.k:
            raise ValueError(f"{len(models)} models for a fused network of {self.k}")
        own, states = self.state_dict(), [m.state_dict() for m in models]  # own: the fused tensors' storage
        if any(list(s) != list(own) for s in states):
            raise ValueError("the members' state_dict keys are not a PreResNet's of this depth")
        for key, t in own.items():
            view, values = self.member_view(key, t), [s[key] for s in states]
            if any(v.shape != view.shape[1:] for v in values):
                raise ValueError(f"{key}: the members' shapes {[tuple(v.shape) for v in values]} are not "
                                 f"{tuple(view.shape[1:])}")
            if key.endswith("num_batches_tracked"):
                if any(not torch.equal(v, values[0]) for v in values):
                    raise ValueError(f"{key} differs between the members: only members at one step fuse")
                t.copy_(values[0])
            else:
                for i, v in enumerate(values):
                    view[i].copy_(v)
        for name, bn in self.named_modules():
            if isinstance(bn, FusedBatchNorm2d):
                hyper = {(m.get_submodule(name).eps, m.get_submodule(name).momentum) for m in models}
                if len(hyper) != 1:
                    raise ValueError(f"{name}: the members' BatchNorm eps and momentum differ: {hyper}")
                bn.eps, bn.momentum = hyper.pop()

    def member_view(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the fused tensor of state_dict ``key``, or a tensor of its shape such as a momentum buffer)
        as ``[k, *member shape]``, a view: ``[i]`` is member i's tensor."""
        prefix, _, attr = key.rpartition(".")
        return self._owners[prefix].member_view(attr, t)

    def member_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's ordinary PreResNet ``state_dict`` (copies, contiguous)."""
        if not 0 <= i < self.k:
            raise IndexError(f"member {i} of a fused network of {self.k}")
        return {key: self.member_view(key, t)[i].clone(memory_format=torch.contiguous_format)
                for key, t in self.state_dict().items()}

    @torch.no_grad()
    def to_members(self, models: Sequence[nn.Module]) -> None:
        """Write member i's weights and buffers into ``models[i]`` (a PreResNet of this depth), in place."""
        if len(models) != self.k:
            raise ValueError(f"{len(models)} models for a fused network of {self.k}")
        own = self.state_dict()
        for i, model in enumerate(models):
            model.load_state_dict({key: self.member_view(key, t)[i] for key, t in own.items()})


# ------------------------------------------------------------------------------------------ optimizers


def _sgd(optimizer) -> torch.optim.SGD:
    opt = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the optimizer itself
    if type(opt) is not torch.optim.SGD or len(opt.param_groups) != 1:
        raise ValueError(f"only SGD optimizers with one parameter group fuse, got {type(opt).__name__} with "
                         f"{len(opt.param_groups)} group(s)")
    return opt


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def _member_params(models: Sequence[nn.Module], optimizers: Sequence, k: int) -> list[dict]:
    """Each member's parameters by name, checked to be what its optimizer steps."""
    if len(models) != k or len(optimizers) != k:
        raise ValueError(f"{len(models)} models and {len(optimizers)} optimizers for a fused network of {k}")
    params = [dict(m.named_parameters()) for m in models]
    for p, opt in zip(params, optimizers):
        if {id(t) for t in p.values()} != {id(t) for t in opt.param_groups[0]["params"]}:
            raise ValueError("each optimizer must step exactly its own model's parameters")
    return params


def fuse_optimizer(fused: FusedPreResNet, models: Sequence[nn.Module], optimizers: Sequence) -> torch.optim.SGD:
    """One SGD over ``fused``'s parameters that steps as the members' SGDs (``optimizers[i]`` steps
    ``models[i]``; one group each, the same hyperparameters): their momentum buffers in block i of its own.
    A member with no momentum yet (before its first step) gives none; all members must agree."""
    opts = [_sgd(o) for o in optimizers]
    members = _member_params(models, opts, fused.k)
    hyper = _hyper(opts[0].param_groups[0])
    if any(_hyper(o.param_groups[0]) != hyper for o in opts[1:]):
        raise ValueError("the members' optimizers must have the same hyperparameters to fuse")
    out = torch.optim.SGD(fused.parameters(), lr=hyper["lr"])
    out.param_groups[0].update(hyper)
    for name, p in fused.named_parameters():
        bufs = [o.state.get(mp[name], {}).get("momentum_buffer") for o, mp in zip(opts, members)]
        if all(b is None for b in bufs):
            continue
        if any(b is None for b in bufs):
            raise ValueError(f"only some members have a momentum buffer for {name}: they stepped differently")
        buf = torch.empty_like(p)
        view = fused.member_view(name, buf)
        for i, b in enumerate(bufs):
            view[i].copy_(b)
        out.state[p]["momentum_buffer"] = buf
    return out


@torch.no_grad()
def unfuse_optimizer_into(fused: FusedPreResNet, optimizer: torch.optim.SGD, models: Sequence[nn.Module],
                          optimizers: Sequence) -> None:
    """Write the fused SGD's hyperparameters (the lr it was last set to) and block i of its momentum buffers
    into ``optimizers[i]`` (which steps ``models[i]``), so that member's optimizer continues as the fused one."""
    opts = [_sgd(o) for o in optimizers]
    members = _member_params(models, opts, fused.k)
    hyper = _hyper(_sgd(optimizer).param_groups[0])
    for i, (opt, mp) in enumerate(zip(opts, members)):
        opt.param_groups[0].update(hyper)
        for name, p in fused.named_parameters():
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is None:
                opt.state.pop(mp[name], None)
            else:
                opt.state[mp[name]] = {"momentum_buffer": torch.empty_like(mp[name]).copy_(
                    fused.member_view(name, buf)[i])}
