"""The datasets, one table: every name, loader, class count, size and default generator comes from here.

A :class:`DatasetSpec` declares a dataset once: its classes, image size and augmentation (zero-padded random
crop of ``pad`` pixels, horizontal flips or not: :mod:`kd.data` turns these into view ids), its standard split
sizes (what the study's disk and memory needs are computed from), its loader (a function of the data folder
returning uint8 NCHW train/test arrays and int64 labels), the generator recipes it trains with (``family``: a
variant such as digits-hard takes its family's) and the model ``python -m kd.synthetic generate`` samples by
default. :func:`register_dataset` adds one (a test's tiny dataset, a new benchmark): every flag's choices, the
loaders, the generators and the report read this table.

No torch: numpy here, scikit-learn and torchvision in the loaders that need them.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd.errors import KDError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    image_size: int
    pad: int  # zero padding of the random crop
    flip: bool  # random horizontal flips
    n_train: int  # the standard split's sizes (a loader may return fewer, e.g. a test's tiny copy)
    n_test: int
    load: Callable[[Path], tuple] = None  # data folder -> (train_x, train_y, test_x, test_y) numpy arrays
    download_bytes: int = 0  # the archive its loader downloads (kept beside the extracted files)
    family: str = ""  # whose generator recipes it trains with (empty: its own name)
    default_model: str = ""  # what `generate` samples when --model is empty (empty: generator-{name})

    @property
    def recipes(self) -> str:
        return self.family or self.name

    def generator_model(self) -> str:
        return self.default_model or f"generator-{self.name}"


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, replace: bool = False) -> DatasetSpec:
    """Add ``spec`` to the table (``replace``: over one of the same name)."""
    if spec.name in DATASETS and not replace:
        raise ValueError(f"dataset {spec.name!r} is registered already")
    if spec.load is None:
        raise ValueError(f"dataset {spec.name!r} needs a loader")
    DATASETS[spec.name] = spec
    return spec


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise KDError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


# digits-hard: the demo's task, hard enough that teachers err and students can disagree with them
HARD_TRAIN, HARD_NOISE, HARD_OCCLUDE = 360, 32.0, 3  # training images kept, noise std (of 255), occluder side


def _load_digits(data_dir: Path | None = None):
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


def _load_digits_hard(data_dir: Path | None = None):
    return _hard(*_load_digits())


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




register_dataset(DatasetSpec("cifar10", 10, 32, 4, True, 50_000, 10_000, lambda root: _load_cifar("cifar10", root),
                             download_bytes=170_498_071, default_model="google/ddpm-cifar10-32"))
register_dataset(DatasetSpec("cifar100", 100, 32, 4, True, 50_000, 10_000,
                             lambda root: _load_cifar("cifar100", root), download_bytes=169_001_437))
register_dataset(DatasetSpec("digits", 10, 8, 1, False, 1437, 360, _load_digits))
register_dataset(DatasetSpec("digits-hard", 10, 8, 1, False, HARD_TRAIN, 360, _load_digits_hard, family="digits"))
