"""BatchNorm over the global batch when several processes train one run: the numbers of one process.

With N processes each holds B/N images of a step's batch of B. Plain BatchNorm would normalise each part by its
own statistics (and keep N different running statistics, of which rank 0's are saved): another model than the
paper's batch of B computes. :func:`synchronise` converts every ``BatchNorm2d`` so that the batch mean and
variance are those of all B images:

* on GPUs, ``torch.nn.SyncBatchNorm`` (torch's own; NCCL);
* on the CPU (processes joined over gloo, as the tests run several processes), :class:`GlobalBatchNorm2d`: the
  per-channel count, sum and sum of squares all-reduced in one collective whose backward all-reduces the
  gradient (:class:`_SumOverRanks`), so its gradient is the global batch's too. It computes the
  variance as E[x^2] - E[x]^2 in float64, then normalises in the input's dtype.

Both update the running statistics as one process would (momentum, the unbiased variance of all B images).
``--sync_bn=False`` keeps per-process statistics (recorded in the run's fingerprint).
"""

from __future__ import annotations

import torch
from torch import nn


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over every process; its gradient is the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of every process's batch together (CPU, gloo)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xd = x.double()
        local = torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)),
                           torch.full((1,), float(x.numel() // c), dtype=torch.float64, device=x.device)])
        total = _SumOverRanks.apply(local)
        count = total[-1]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        shape = (1, c, 1, 1)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def _to_global(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        like = module.weight if module.affine else module.running_mean  # its device and dtype
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, device=like.device, dtype=like.dtype)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _to_global(child))
    return module


def synchronise(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm computing over the global batch (module docstring); the same state dict."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_global(model)
