"""Datasets on the training device, augmented with batched tensor code (no DataLoader, no PIL).

Images stay uint8 ``[N, 3, H, W]`` on the device. The paper's augmentation (random crop with zero padding,
horizontal flip) is written as a *view id* per image, ``view = (dy * (2p+1) + dx) * F + flip`` with F = 2
when flips are on (else 1): CIFAR has 9 x 9 x 2 = 162 views, digits 3 x 3 = 9. :func:`apply_views` turns
images and view ids into the float batch in [-1, 1]; the teacher-output cache keys on the same ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd.datasets import DatasetSpec, dataset_spec


@dataclass
class Data:
    spec: DatasetSpec
    train_x: torch.Tensor  # uint8 [N, 3, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def n_train(self) -> int:
        return self.train_x.shape[0]

    @property
    def num_views(self) -> int:
        return num_views(self.spec)

    def to(self, device) -> Data:
        return Data(self.spec, *(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y)))


def num_views(spec: DatasetSpec) -> int:
    return (2 * spec.pad + 1) ** 2 * (2 if spec.flip else 1)


def load_dataset(name: str, data_dir: str | Path = "data", device: str | torch.device = "cpu") -> Data:
    """A dataset of :data:`kd.datasets.DATASETS` as uint8 tensors on ``device``."""
    spec = dataset_spec(name)
    arrays = spec.load(Path(data_dir))
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    return Data(spec, tensors[0], tensors[1].long(), tensors[2], tensors[3].long()).to(device)


# ---------------------------------------------------------------------------------------------------------
# augmentation as view ids


def sample_views(n: int, spec: DatasetSpec, generator: torch.Generator) -> torch.Tensor:
    """One uniformly random view id per image (int64, on the generator's device)."""
    return torch.randint(0, num_views(spec), (n,), generator=generator, device=generator.device)


def decode_views(views: torch.Tensor, spec: DatasetSpec):
    f = 2 if spec.flip else 1
    side = 2 * spec.pad + 1
    flip = views % f
    pos = views // f
    return pos // side, pos % side, flip.bool()  # dy, dx in [0, 2p], flip


def apply_views(x: torch.Tensor, views: torch.Tensor | None, spec: DatasetSpec) -> torch.Tensor:
    """uint8 [B,3,H,W] + view ids -> float [B,3,H,W] in [-1, 1]. ``views=None``: the clean image."""
    if views is not None:
        x = crop_flip(x, views, spec)
    return x.float().div_(127.5).sub_(1.0)


def crop_flip(x: torch.Tensor, views: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """Zero-padded random crop + optional horizontal flip, in uint8 pixel space, batched by gather."""
    b, c, h, w = x.shape
    p = spec.pad
    dy, dx, flip = decode_views(views.to(x.device), spec)
    padded = torch.nn.functional.pad(x, (p, p, p, p))  # zeros
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = (dy[:, None] + ar_h[None]).view(b, 1, h, 1).expand(b, c, h, w + 2 * p)
    cols = dx[:, None] + ar_w[None]
    cols = torch.where(flip[:, None], cols.flip(-1), cols).view(b, 1, 1, w).expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


# ---------------------------------------------------------------------------------------------------------
# batching


def epoch_generator(seed: int, epoch: int, device) -> torch.Generator:
    """Each epoch's randomness depends on (seed, epoch) only, so a resumed run replays it exactly."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch)
    return g


def split_batch(batch_size: int, n_real: int, n_synthetic: int) -> tuple[int, int]:
    """The paper's static-pool split: real = ceil(B * n_real / (n_real + N)), synthetic = B - real."""
    if n_synthetic <= 0:
        return batch_size, 0
    real = math.ceil(batch_size * n_real / (n_real + n_synthetic))
    return real, batch_size - real


def rank_part(chunk: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous part of one step's batch (every rank takes ceil(B / world) or fewer)."""
    if world <= 1:
        return chunk
    per = math.ceil(chunk.numel() / world)
    return chunk[rank * per:(rank + 1) * per]


def step_batches(indices: torch.Tensor, batch: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """A permutation cut into per-step batches of ``batch`` (the last may be short), this rank's part of each."""
    steps = math.ceil(indices.numel() / batch)
    return [rank_part(indices[s * batch:(s + 1) * batch], rank, world) for s in range(steps)]
