"""kd.student: what one student needs beyond the loop (shared by distill.py and packed grids): its pool's images
checked against its dataset, and the room its run and teacher cache need."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from kd import names, student
from kd.config import DistillConfig
from kd.data import load_dataset
from kd.errors import KDError
from kd.io import save_tensors, write_json
from kd.models import build_model, count_params
from kd.session import room_needed

SESSION = SimpleNamespace(main=True, main_first=lambda fn: fn(), tracker=SimpleNamespace(run=None))


def _pool(folder, n: int, dataset: str = "digits", size: int = 8):
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    digest = save_tensors(folder / "pool.safetensors", {"images": images})
    write_json(folder / "pool.json", {"sha256": digest, "count": n, "dataset": dataset, "model": "gen", "fid": 7.5})
    return images


def test_a_students_synthetic_images_and_the_keys_they_add(tmp_path):
    data = load_dataset("digits")
    images = _pool(tmp_path, 1000)
    cfg = DistillConfig(dataset="digits", synthetic_ratio=0.5, synthetic_pool=str(tmp_path))
    got, info = student.synthetic_images(cfg, data, SESSION)
    assert len(got) == round(0.5 * data.n_train) and torch.equal(got, images[:len(got)])
    assert info[names.SYNTHETIC_SOURCE] == "gen" and info[names.SYNTHETIC_FID] == 7.5
    assert student.synthetic_images(dataclasses.replace(cfg, synthetic_ratio=0.0), data, SESSION) == (None, {})


@pytest.mark.parametrize("case,needle", [("small", "needs 718 synthetic images but the pool"),
                                         ("dataset", "was generated for cifar10")])
def test_a_pool_that_does_not_fit_is_refused(tmp_path, case, needle):
    _pool(tmp_path, 100 if case == "small" else 1000, "cifar10" if case == "dataset" else "digits")
    cfg = DistillConfig(dataset="digits", synthetic_ratio=0.5, synthetic_pool=str(tmp_path))
    with pytest.raises(KDError, match=needle):
        student.synthetic_images(cfg, load_dataset("digits"), SESSION)


def test_the_room_counts_one_teacher_cache_file_per_member():
    data, model = load_dataset("digits"), build_model("preresnet8", 10)
    per_member = data.n_train * data.num_views * 10 * 4
    cfg = DistillConfig(dataset="digits", ensemble_size=3)
    assert student.room(cfg, data, model) == room_needed(count_params(model), 3 * per_member)
    assert student.room(dataclasses.replace(cfg, teacher_cache=False), data, model) == room_needed(count_params(model))
