import hashlib
import pickle

import numpy as np
import pytest
import torch

from kd.data import DATASETS, apply_views, crop_flip, decode_views, load_dataset, num_views, sample_views, split_batch
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
