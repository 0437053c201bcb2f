"""kd.objectives: what a step optimises. A teacher's cross-entropy and a student's distillation draw their epochs
from (seed, epoch) only; a student's batch holds the paper's real/synthetic split, the labels of its real rows
and the teacher's outputs on exactly that batch; its loss is the registry's (``--loss``)."""

from __future__ import annotations

import dataclasses
import functools

import torch

from kd import losses
from kd.config import DistillConfig, TrainConfig
from kd.data import Data, load_dataset, split_batch
from kd.models import Ensemble, build_model
from kd.objectives import Distill, Supervised


@functools.cache
def digits() -> Data:
    d = load_dataset("digits")
    return Data(d.spec, d.train_x[:100], d.train_y[:100], d.test_x[:20], d.test_y[:20])


def _teacher() -> Ensemble:
    torch.manual_seed(0)
    return Ensemble([build_model("preresnet8", 10).eval()])


def test_a_teachers_epochs_follow_its_seed_and_epoch_only(one_thread):
    cfg = TrainConfig(dataset="digits", batch_size=32, seed=4)
    a = [b["x"] for b in Supervised.from_config(cfg, digits()).batches(epoch=2)]
    b = [b["x"] for b in Supervised.from_config(cfg, digits()).batches(epoch=2, start=1)]
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a[1:], b))
    other = Supervised.from_config(dataclasses.replace(cfg, seed=5), digits())
    assert not torch.equal(next(other.batches(epoch=2))["x"], a[0])


def test_a_students_batch_is_the_papers_split_with_labels_and_its_teachers_targets(one_thread):
    data, teacher = digits(), _teacher()
    synthetic = torch.randint(0, 256, (25, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cfg = DistillConfig(dataset="digits", batch_size=20, trial=3)
    obj = Distill(cfg, data, teacher, synthetic)
    real, syn = split_batch(20, 100, 25)
    assert (obj.real_b, obj.syn_b) == (real, syn) == (16, 4) and obj.steps(0) == 7
    batch = next(obj.batches(epoch=0))
    assert batch["x"].shape == (20, 3, 8, 8)
    assert (batch["y"][:real] >= 0).all() and (batch["y"][real:] == -1).all()  # no label on a generator's image
    with torch.no_grad():
        want = teacher(batch["x"].contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(batch["target"], want)  # the teacher saw exactly the student's batch
    assert obj.seed == cfg.run_seed


def test_the_students_loss_is_the_one_the_config_names(one_thread, monkeypatch):
    data, teacher = digits(), _teacher()
    calls = []
    monkeypatch.setitem(losses.LOSSES, "traced", losses.Loss(
        lambda z, b, cfg: calls.append(cfg.temperature) or losses.kd_loss(z, b["target"], cfg.temperature), "test"))
    obj = Distill(DistillConfig(dataset="digits", batch_size=50, loss="traced", temperature=2.0), data, teacher)
    batch = next(obj.batches(epoch=0))
    loss, sums = obj.loss(torch.zeros(50, 10), batch)
    assert calls == [2.0] and sums["n"] == 50 and torch.isfinite(loss)
