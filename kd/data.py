"""Datasets on the training device, augmented with batched tensor code (no DataLoader, no PIL).

Images stay uint8 ``[N, 3, H, W]`` on the device. The paper's augmentation (random crop with zero padding,
horizontal flip) is written as a *view id* per image, ``view = (dy * (2p+1) + dx) * F + flip`` with F = 2
when flips are on (else 1): CIFAR has 9 x 9 x 2 = 162 views, digits 3 x 3 = 9. :func:`apply_views` turns
images and view ids into the float batch in [-1, 1]; the teacher-output cache keys on the same ids.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd.errors import KDError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    image_size: int
    pad: int
    flip: bool


DATASETS = {
    "cifar10": DatasetSpec("cifar10", 10, 32, 4, True),
    "cifar100": DatasetSpec("cifar100", 100, 32, 4, True),
    "digits": DatasetSpec("digits", 10, 8, 1, False),
    "digits-hard": DatasetSpec("digits-hard", 10, 8, 1, False),
}
# digits-hard: the demo's task, hard enough that teachers err and students can disagree with them
HARD_TRAIN, HARD_NOISE, HARD_OCCLUDE = 360, 32.0, 3  # training images kept, noise std (of 255), occluder side


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
    if name not in DATASETS:
        raise KDError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    if name == "digits":
        arrays = _load_digits()
    elif name == "digits-hard":
        arrays = _hard(*_load_digits())
    else:
        arrays = _load_cifar(name, Path(data_dir))
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    return Data(spec, tensors[0], tensors[1].long(), tensors[2], tensors[3].long()).to(device)


def _load_digits():
    """scikit-learn's bundled 8x8 digits: a fixed stratified 80/20 split, 3 channels, 0..255."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None].repeat(3, axis=1)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return xtr, ytr, xte, yte


def _hard(xtr, ytr, xte, yte):
    """digits made harder, the same for every run (a fixed seed): a stratified subset of 360 training images,
    every image (train and test) with Gaussian pixel noise and one black 3x3 square at a random place."""
    from sklearn.model_selection import train_test_split

    xtr, _, ytr, _ = train_test_split(xtr, ytr, train_size=HARD_TRAIN, stratify=ytr, random_state=0)
    rng = np.random.default_rng(0)

    def corrupt(x):
        x = x.astype(np.float32) + rng.normal(0.0, HARD_NOISE, size=x[:, :1].shape).astype(np.float32)
        side, size = HARD_OCCLUDE, x.shape[-1]
        for img, (r, c) in zip(x, rng.integers(0, size - side + 1, size=(len(x), 2))):
            img[:, r:r + side, c:c + side] = 0.0
        return np.clip(np.round(x), 0, 255).astype(np.uint8)

    return corrupt(xtr), ytr, corrupt(xte), yte


_CIFAR_FILES = {"cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
                "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz")}


@contextlib.contextmanager
def data_lock(root: Path):
    """An exclusive ``fcntl.flock`` on ``<root>.lock``, the file beside the data folder, held while a dataset is
    checked, downloaded and read there: several processes on one machine (one sweep agent per GPU) download it
    once, and none reads a folder another is filling. The kernel releases it when its holder dies, even by
    SIGKILL. The holder removes the file as it lets go (nothing is left beside the data), so a process that
    locked a file that has been removed meanwhile (its inode is no longer the path's) locks the new one instead."""
    import fcntl
    import os

    root = Path(root).resolve()
    root.parent.mkdir(parents=True, exist_ok=True)
    lock = root.parent / f"{root.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process's download into {root} (lock {lock})", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            held = os.stat(lock)
            mine = os.fstat(fd)
            if (held.st_dev, held.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was removed (or replaced) while this process waited for it
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while held: whoever waits on this file notices and locks a new one
        os.close(fd)


def _remove(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink(missing_ok=True)


def _load_cifar(name: str, root: Path):
    """torchvision's CIFAR (downloaded into ``root`` when missing), as uint8 NCHW arrays, under
    :func:`data_lock`. A failed download leaves nothing behind: what this process created (``root``, the
    extracted folder, the archive) is removed again, under the lock, so never while another process fills it."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    folder, archive = _CIFAR_FILES[name]
    out = []
    with data_lock(root):
        made = [p for p in (root, root / folder, root / archive) if not p.exists()]
        for train in (True, False):
            try:
                ds = cls(root=str(root), train=train, download=not (root / folder).exists())
            except Exception as e:  # urllib/URLError/OSError/RuntimeError: no network or a broken folder
                _remove(made)
                raise KDError(
                    f"{name} is not in {root / folder} and could not be downloaded ({type(e).__name__}): "
                    f"place {archive} (from https://www.cs.toronto.edu/~kriz/) in {root} or extract it "
                    f"there, or pass --data_dir=FOLDER"
                ) from None
            out += [ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets)]
    return out


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
