import hashlib
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.data import (
    Data,
    apply_views,
    crop_flip,
    decode_views,
    load_dataset,
    num_views,
    sample_views,
    split_batch,
)
from kd.datasets import DATASETS
from kd.errors import KDError
from kd.objectives import Supervised

CIFAR = DATASETS["cifar10"]
DIGITS = DATASETS["digits"]


def test_view_counts():
    assert num_views(CIFAR) == 9 * 9 * 2 == 162
    assert num_views(DIGITS) == 3 * 3


def test_padding_pixels_are_zero_before_scaling():
    x = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    view = torch.tensor([0])  # dy = dx = 0: the crop's top-left corner is the padded corner
    out = crop_flip(x, view, CIFAR)
    assert (out[0, :, :4, :] == 0).all() and (out[0, :, :, :4] == 0).all()
    assert (out[0, :, 4:, 4:] == 255).all()
    scaled = apply_views(x, view, CIFAR)
    assert scaled.min() == -1.0 and scaled.max() == 1.0


def test_every_view_is_a_shifted_and_maybe_flipped_copy():
    x = torch.randint(1, 256, (1, 3, 8, 8), dtype=torch.uint8)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for v in range(num_views(CIFAR)):
        dy, dx, flip = (t.item() for t in decode_views(torch.tensor([v]), CIFAR))
        want = padded[..., dy:dy + 8, dx:dx + 8]
        if flip:
            want = want.flip(-1)
        assert torch.equal(crop_flip(x, torch.tensor([v]), CIFAR), want)


def test_flips_only_where_enabled():
    g = torch.Generator().manual_seed(0)
    views = sample_views(10_000, DIGITS, g)
    assert not decode_views(views, DIGITS)[2].any()
    views = sample_views(10_000, CIFAR, torch.Generator().manual_seed(0))
    share = decode_views(views, CIFAR)[2].float().mean().item()
    assert 0.45 < share < 0.55


def test_same_seed_same_batches_and_epochs_differ():
    data = load_dataset("digits")
    a = [b["x"] for b in Supervised(data, 256, seed=3).batches(epoch=1)]
    b = [b["x"] for b in Supervised(data, 256, seed=3).batches(epoch=1)]
    c = [b["x"] for b in Supervised(data, 256, seed=3).batches(epoch=2)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    resumed = [b["x"] for b in Supervised(data, 256, seed=3).batches(epoch=1, start=2)]
    assert all(torch.equal(u, v) for u, v in zip(a[2:], resumed)) and len(resumed) == len(a) - 2


def test_digits_dataset_is_fixed_stratified_three_channel():
    d = load_dataset("digits")
    assert d.train_x.shape[1:] == (3, 8, 8) and d.train_x.dtype == torch.uint8
    assert d.n_train + d.test_x.shape[0] == 1797
    assert torch.equal(d.train_x[:, 0], d.train_x[:, 2])
    counts = torch.bincount(d.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert torch.equal(load_dataset("digits").train_y, d.train_y)


@pytest.mark.parametrize("n_syn,expected", [(0, (128, 0)), (12_500, (103, 25)), (25_000, (86, 42)),
                                            (37_500, (74, 54)), (50_000, (64, 64))])
def test_split_batch_paper_splits(n_syn, expected):
    assert split_batch(128, 50_000, n_syn) == expected


def _write_tiny_cifar(root, n_per_batch=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
        files[name] = (data, labels)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder, files


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar_loads_from_a_cifar_format_folder(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder, files = _write_tiny_cifar(tmp_path)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")]
                                                for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    d = load_dataset("cifar10", tmp_path)
    assert d.train_x.shape == (30, 3, 32, 32) and d.test_x.shape == (6, 3, 32, 32)
    first = files["data_batch_1"][0][0].reshape(3, 32, 32)
    assert np.array_equal(d.train_x[0].numpy(), first)
    assert d.test_y.tolist() == files["test_batch"][1]


def test_missing_cifar_names_folder_and_file(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    def no_network(self):
        raise OSError("no network")

    monkeypatch.setattr(CIFAR100, "download", no_network)
    with pytest.raises(KDError) as e:
        load_dataset("cifar100", tmp_path / "nowhere")
    msg = str(e.value)
    assert "cifar-100-python.tar.gz" in msg and str(tmp_path / "nowhere") in msg and "\n" not in msg


# ------------------------------------------------------------------------- several processes, one download
def _fake_cifar10(monkeypatch, tmp_path, download):
    """torchvision's CIFAR10 with its md5 lists made for the tiny folder :func:`_write_tiny_cifar` writes, and
    ``download`` (a function of the dataset's root) in place of the network download."""
    from torchvision.datasets import CIFAR10

    folder, _ = _write_tiny_cifar(tmp_path / "model")
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")]
                                                for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    monkeypatch.setattr(CIFAR10, "download", lambda self: download(Path(self.root)))


def _together(n, fn):
    """``fn()`` in ``n`` threads started at once; each one's result or exception."""
    barrier, results = threading.Barrier(n), [None] * n

    def go(i):
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as e:  # noqa: BLE001 - the test looks at it
            results[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


class Downloads:
    """A fake download that records how many ran and how many ran at the same time."""

    def __init__(self, fail_first=False):
        self.count = self.active = self.most = 0
        self.fail_first, self.lock = fail_first, threading.Lock()

    def __call__(self, root: Path):
        with self.lock:
            self.count += 1
            self.active += 1
            self.most = max(self.most, self.active)
            first = self.count == 1
        try:
            time.sleep(0.3)  # long enough for the other one to arrive while this one fills the folder
            if first and self.fail_first:
                (root / "cifar-10-batches-py").mkdir(parents=True)
                (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half")
                time.sleep(0.2)
                raise OSError("connection reset")
            _write_tiny_cifar(root)
        finally:
            with self.lock:
                self.active -= 1


def test_two_loaders_at_once_download_cifar_once(tmp_path, monkeypatch):
    downloads = Downloads()
    _fake_cifar10(monkeypatch, tmp_path, downloads)
    root = tmp_path / "shared" / "data"
    a, b = _together(2, lambda: load_dataset("cifar10", root))
    assert downloads.count == 1 and downloads.most == 1
    assert isinstance(a, Data) and isinstance(b, Data), (a, b)
    assert torch.equal(a.train_x, b.train_x) and a.train_x.shape == (30, 3, 32, 32)
    assert not (tmp_path / "shared" / "data.lock").exists()  # the lock file beside the data folder is gone again


def test_a_failed_download_never_removes_a_folder_another_loader_fills(tmp_path, monkeypatch):
    downloads = Downloads(fail_first=True)
    _fake_cifar10(monkeypatch, tmp_path, downloads)
    root = tmp_path / "data"
    results = _together(2, lambda: load_dataset("cifar10", root))
    failed = [r for r in results if isinstance(r, KDError)]
    loaded = [r for r in results if isinstance(r, Data)]
    assert len(failed) == 1 and len(loaded) == 1, results  # without the lock the failure deleted the other's folder
    assert "connection reset" not in str(failed[0]) and "could not be downloaded (OSError)" in str(failed[0])
    assert downloads.count == 2 and downloads.most == 1  # one after the other, under the lock
    assert loaded[0].train_x.shape == (30, 3, 32, 32)
    assert load_dataset("cifar10", root).test_x.shape == (6, 3, 32, 32) and downloads.count == 2  # stays there


def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    """No network: one line naming where to put the archive; neither the data folder nor its lock file is left."""
    def offline(root: Path):
        raise OSError("no network")

    _fake_cifar10(monkeypatch, tmp_path / "fake", offline)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(KDError, match="place cifar-10-python.tar.gz"):
        load_dataset("cifar10", work / "data")
    assert list(work.iterdir()) == []


def test_digits_hard_is_a_fixed_harder_digits_with_its_family_recipes():
    from kd.data import load_dataset
    from kd.synthetic.config import GenerateConfig, GeneratorTrainConfig

    hard, easy = load_dataset("digits-hard"), load_dataset("digits")
    assert hard.n_train == 360 and hard.test_x.shape == easy.test_x.shape and hard.spec.num_classes == 10
    assert torch.equal(hard.test_y, easy.test_y) and not torch.equal(hard.test_x, easy.test_x)  # corrupted
    assert torch.equal(load_dataset("digits-hard").train_x, hard.train_x)  # the same for every run
    assert (hard.test_x.float().std() > 0) and torch.equal(hard.test_x[:, 0], hard.test_x[:, 2])  # grey
    cfg = GeneratorTrainConfig(dataset="digits-hard")
    assert cfg.preset_name() == "digits" and cfg.artifact_name() == "generator-digits-hard"
    assert GenerateConfig(dataset="digits-hard").model_ref() == "generator-digits-hard"
