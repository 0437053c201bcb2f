"""kd.engine: the one training loop of teachers and students (a plain run is a group of one member)."""

from __future__ import annotations

import math

import pytest

from kd import names
from kd.config import TrainConfig
from kd.data import load_dataset
from kd.engine import fit
from kd.errors import KDError
from kd.models import build_model, to_device
from kd.objectives import Supervised
from kd.optim import cosine_lr, optimizer
from kd.session import Session


def _member(cfg: TrainConfig, objective_cls=Supervised):
    session = Session(cfg, job="teacher")
    data = load_dataset(cfg.dataset)
    model = to_device(build_model(cfg.arch, data.spec.num_classes), session.device, cfg.channels_last)
    session.start_tracking()
    return session, session.member(model, optimizer(model.parameters(), cfg), objective_cls.from_config(cfg, data))


def test_a_run_trains_every_epoch_and_evaluates_on_its_cadence_and_at_the_end(workdir, one_thread, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = TrainConfig(dataset="digits", arch="preresnet8", batch_size=512, epochs=5, eval_every=2, lr=0.05)
    session, m = _member(cfg)
    fit([m])
    assert [row[names.EPOCH] for row in m.history] == [1, 2, 3, 4, 5]
    assert [names.TEST_ACC in row for row in m.history] == [False, True, False, True, True]
    assert [row[names.LR] for row in m.history] == [cosine_lr(e, 5, 0.05, 0.0) for e in range(5)]
    assert all(math.isfinite(row[names.TRAIN_LOSS]) for row in m.history)
    assert (m.epoch, m.step) == (5, 0) and session.folder.checkpoints.load("")["epoch"] == 5


class Diverging(Supervised):
    def loss(self, logits, batch):
        loss, sums = super().loss(logits, batch)
        return loss * float("nan"), {**sums, "loss": sums["loss"] * float("nan")}


def test_a_loss_that_is_not_finite_is_one_error_naming_where(workdir, one_thread, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = TrainConfig(dataset="digits", arch="preresnet8", batch_size=64, epochs=1)
    _, m = _member(cfg, Diverging)
    with pytest.raises(KDError, match=r"the training loss became nan in epoch 1 \(step 23\): lower --lr"):  # its end
        fit([m])
    assert m.epoch == 0 and not m.history  # nothing of the diverged epoch was recorded


@pytest.mark.parametrize("every_s,saved", [(0.0, [1, 2, 3]), (1e6, [3])])
def test_checkpoints_follow_their_cadence_in_seconds_and_the_last_epoch_always(workdir, one_thread, monkeypatch,
                                                                               every_s, saved):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = TrainConfig(dataset="digits", arch="preresnet8", batch_size=512, epochs=3, checkpoint_every_s=every_s)
    session, m = _member(cfg)
    epochs, save = [], session.save_checkpoint
    monkeypatch.setattr(session, "save_checkpoint", lambda tensors, info, **kw: (epochs.append(info["epoch"]),
                                                                                save(tensors, info, **kw)))
    fit([m])
    assert epochs == saved and session.folder.checkpoints.load("")["epoch"] == 3
    assert all(names.TEST_ACC in row for row in m.history)  # eval_every auto: every epoch on the CPU
