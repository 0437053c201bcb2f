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

SESSION = SimpleNamespace(main=True, main_first=lambda fn: fn(), tracker=SimpleNamespace(run=None),
                          device=torch.device("cpu"))


def _pool(folder, n: int, dataset: str = "digits", size: int = 8):
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    digest = save_tensors(folder / "pool.safetensors", {"images": images})
    write_json(folder / "pool.json", {"sha256": digest, "count": n, "dataset": dataset, "model": "gen", "fid": 7.5})
    return images


def _draw(cfg: DistillConfig, data):
    images, info = student.synthetic_images(cfg, data, SESSION)
    return images, info[names.SYNTHETIC_DRAW]


def test_pool_draws_are_the_trials_own_blocks_and_no_amount_is_a_prefix_of_another(tmp_path):
    data = load_dataset("digits")
    pool = _pool(tmp_path, 3 * 718)
    cfg = DistillConfig(dataset="digits", synthetic_ratio=0.5, synthetic_pool=str(tmp_path))
    draws = {t: _draw(dataclasses.replace(cfg, trial=t), data) for t in range(3)}
    rows = [{tuple(img.flatten().tolist()) for img in images} for images, _ in draws.values()]
    assert all(len(r) == 718 for r in rows) and not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert len({d["sha256"] for _, d in draws.values()}) == 3 and all(len(d["sha256"]) == 64 for _, d in draws.values())
    quarter, _ = _draw(dataclasses.replace(cfg, synthetic_ratio=0.125), data)
    assert not torch.equal(quarter, draws[0][0][:len(quarter)])  # +N/4 is not the first quarter of +N
    again, record = _draw(cfg, data)
    assert torch.equal(again, draws[0][0]) and record == draws[0][1]  # a rerun (a resume) draws the same
    assert {tuple(img.flatten().tolist()) for img in again} <= {tuple(img.flatten().tolist()) for img in pool}
    with pytest.raises(KDError, match="generate a pool of 2872 images or more"):
        _draw(dataclasses.replace(cfg, trial=3), data)


def test_generator_draws_are_the_runs_own_samples(tmp_path):
    from kd.generators import sngan
    from kd.generators.presets import GAN_PRESETS

    torch.manual_seed(0)
    g = sngan.generator_of(GAN_PRESETS["digits"])
    sngan.save_generator(tmp_path / "gen", g, GAN_PRESETS["digits"], {"step": 300, "fid": 12.5})
    data = load_dataset("digits")
    cfg = DistillConfig(dataset="digits", synthetic_ratio=0.25, synthetic_generator=str(tmp_path / "gen"))
    a, info = student.synthetic_images(cfg, data, SESSION)
    b, draw_b = _draw(dataclasses.replace(cfg, trial=1), data)
    c, draw_c = _draw(dataclasses.replace(cfg, synthetic_ratio=0.5), data)
    draw_a = info[names.SYNTHETIC_DRAW]
    assert a.shape == (359, 3, 8, 8) and a.dtype == torch.uint8 and info[names.SYNTHETIC_FID] == 12.5
    assert info[names.SYNTHETIC_SOURCE] == str(tmp_path / "gen") and draw_a["kind"] == "sampled"
    assert len({draw_a["sha256"], draw_b["sha256"], draw_c["sha256"]}) == 3
    assert not torch.equal(c[:359], a)  # the larger amount is its own draw, not a continuation
    assert torch.equal(_draw(cfg, data)[0], a)


@pytest.mark.parametrize("case,needle", [("small", "generate a pool of 718 images or more"),
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
