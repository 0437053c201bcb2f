"""Models: the authors' PreResNet family, a timm bridge, and ensembles.

``build_model("preresnet56", 100)`` is the network of Stanton et al. (gnosis code): bottleneck blocks from
depth 44 (n = (depth-2)/9 per stage), basic blocks below (n = (depth-2)/6); a bare 3x3 stem; pre-activation
blocks whose projection shortcut (1x1 conv, stride s, no BN) sees the raw block input; BN-ReLU-pool-linear
head. ``build_model("timm:resnet18", 10)`` builds any timm model, untrained. The usual PreResNet depths are also
registered with timm (``@register_model``), so ``timm.create_model("preresnet56", num_classes=100)`` works.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KDError
from kd.names import PRERESNET, check_arch, check_depth


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.downsample = _shortcut(inplanes, planes * self.expansion, stride)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (x if self.downsample is None else self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.downsample = _shortcut(inplanes, planes * self.expansion, stride)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + (x if self.downsample is None else self.downsample(x))


def _shortcut(inplanes: int, outplanes: int, stride: int):
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Conv2d(inplanes, outplanes, 1, stride, bias=False)  # on the raw input, no BN


class PreResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        check_depth(depth)
        block = Bottleneck if depth >= 44 else BasicBlock
        n = (depth - 2) // (9 if depth >= 44 else 6)
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.layer1 = self._stage(block, 16, n, 1)
        self.layer2 = self._stage(block, 32, n, 2)
        self.layer3 = self._stage(block, 64, n, 2)
        self.bn = nn.BatchNorm2d(64 * block.expansion)
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / k))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _stage(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = [block(self.inplanes, planes, stride)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(x.mean((2, 3)))


def build_model(arch: str, num_classes: int) -> nn.Module:
    check_arch(arch)
    m = PRERESNET.match(arch)
    if m:
        return PreResNet(int(m.group(1)), num_classes)
    import timm

    return timm.create_model(arch[5:], pretrained=False, num_classes=num_classes)


def _register_with_timm(depth: int) -> None:
    from timm.models import register_model

    def entrypoint(pretrained: bool = False, num_classes: int = 10, **kwargs) -> nn.Module:
        if pretrained:
            raise KDError(f"there are no pretrained preresnet{depth} weights: pass pretrained=False")
        return PreResNet(depth, num_classes)

    entrypoint.__name__ = entrypoint.__qualname__ = f"preresnet{depth}"
    entrypoint.__module__ = __name__
    register_model(entrypoint)


for _depth in (8, 14, 20, 26, 32, 38, 47, 56, 65, 110):
    _register_with_timm(_depth)


def ensemble_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """[m, B, C] member logits -> [B, C] log of the mean member probability (logsumexp, stable)."""
    if logits.dim() != 3:
        raise ValueError(f"expected member logits of shape [m, B, C], got {tuple(logits.shape)}")
    m = logits.shape[0]
    return torch.logsumexp(F.log_softmax(logits.float(), dim=-1), dim=0) - math.log(m)


class Ensemble(nn.Module):
    """m frozen members in eval mode, run as one fused network where they can be (:mod:`kd.fused`).

    ``forward(x)`` returns the ensemble's log-probabilities (log of mean probabilities), ``[B, C]``;
    ``member_logits(x)`` returns ``[m, B, C]``. ``stacked=True`` runs PreResNet members of one depth and class
    count as one :class:`~kd.fused.FusedPreResNet` in eval mode (its ``fused_member_logits``: the batch is read
    once for all members), other members one by one; ``stacked=False`` runs the members one by one (the
    reference); ``stacked=None`` (default) fuses on accelerators and loops on the CPU, where the loop is the
    faster (``make bench`` measures both).
    """

    def __init__(self, members: list[nn.Module], stacked: bool | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        for p in self.parameters():
            p.requires_grad_(False)
        self.stacked = stacked
        self.eval()
        self._fused = None  # (device, the fused network) once built

    def train(self, mode: bool = True):  # members stay in eval mode whatever the caller asks
        return super().train(False)

    def fusable(self) -> bool:
        """Whether the members fuse (more than one): PreResNets of one depth, class count, dtype and device whose
        BatchNorms agree in eps, momentum and ``num_batches_tracked`` (what one fused BatchNorm holds once)."""
        if len(self.members) < 2 or any(type(m) is not PreResNet for m in self.members):
            return False
        return len({_fuse_signature(m) for m in self.members}) == 1

    def _fused_members(self, device: torch.device) -> nn.Module:
        if self._fused is None or self._fused[0] != device:
            from kd.fused import FusedPreResNet  # kd.fused builds on this module's PreResNet

            self._fused = (device, FusedPreResNet.from_members(list(self.members)).eval())
        return self._fused[1]

    @torch.no_grad()
    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        fused = x.device.type != "cpu" if self.stacked is None else self.stacked
        if not fused or not self.fusable():
            return torch.stack([m(x) for m in self.members])
        return self._fused_members(x.device).fused_member_logits(x)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_log_probs(self.member_logits(x))

    def _apply(self, fn, recurse=True):  # .to(device) invalidates the fused copy
        self._fused = None
        return super()._apply(fn, recurse)


def _fuse_signature(model: PreResNet) -> tuple:
    p = model.conv1.weight
    bns = tuple((b.eps, b.momentum, int(b.num_batches_tracked)) for b in model.modules()
                if isinstance(b, nn.BatchNorm2d))
    return len(model.layer1), type(model.layer1[0]), model.fc.out_features, p.dtype, p.device, bns


def to_device(model: nn.Module, device, channels_last: bool = True) -> nn.Module:
    """The model on ``device``, in NHWC memory format where ``channels_last`` (faster convolutions on GPUs)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def weights_sha256(model: nn.Module) -> str:
    """The sha256 of a model's state (every tensor's name, dtype, shape and bytes, in state_dict order): equal for
    equal weights, whatever device holds them."""
    import hashlib

    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
