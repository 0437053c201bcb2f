"""The training loop of ``python -m kd.sweep.pack``: the members of a pack step together, each keeps its own run.

A member is one ``distill.py`` run: its own :class:`MemberSession` (the engine's :class:`~kd.engine.Session`:
run folder, checkpoints, resume, W&B run, publishing), model, optimizer and :class:`~kd.objectives.Distill`
objective (its batches, targets, loss, metrics and evaluation). What the pack shares is the step: one
forward and backward of all members (:mod:`kd.packing`), then per member exactly what the engine does at
the end of an epoch (metrics row, evaluation, checkpoint in the engine's format, W&B log).

Positions: every member has its own (epoch, step). Normally all are equal; a pack killed while it saved
its members' checkpoints one by one leaves some a step or an epoch ahead. :func:`fit_pack` then trains the
members at the lowest position, alone, until they reach the next one, and packs them again: a member's
numbers depend only on its own state, so this is what an uninterrupted pack computes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from kd import faults, names
from kd.engine import Session, _check_finite, _floats, cosine_lr, unlocked
from kd.errors import Interrupted, KDError, stop_requests
from kd.packing import LoopedPack, StackedPack


class MemberSession(Session):
    """A Session whose W&B run is one of several open in this process (``reinit="create_new"``) and is logged
    to directly, not through Accelerate's tracker (which keeps one global run)."""

    def _init_run(self) -> None:
        if self.mode == "disabled":
            return
        import wandb

        cfg = self.cfg
        try:
            self.run = wandb.init(project=cfg.project, config=unlocked(self.config()), id=self.run_id,
                                  resume="allow", name=cfg.run_name(), group=cfg.study, mode=self.mode,
                                  job_type=names.JOB_TYPES.get(self.job, self.job), reinit="create_new",
                                  tags=[self.job, cfg.dataset, cfg.arch, "packed"])
        except (wandb.errors.Error, ValueError, OSError) as e:
            raise KDError(f"cannot start the W&B run {cfg.run_name()} in project {cfg.project} "
                          f"({(str(e).splitlines() or [type(e).__name__])[0][:200]}): check `wandb login`, "
                          "or run offline with WANDB_MODE=offline") from None

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def end(self, exit_code: int = 0) -> None:
        run, ended = self.run, self._ended
        super().end(exit_code)  # a stopped or failed run: marked and finished there
        if run is not None and not ended and not exit_code:
            run.finish()


@dataclass
class Member:
    cfg: object
    session: MemberSession
    model: object
    optimizer: object
    objective: object
    extra: dict
    epoch: int = 0
    step: int = 0
    sums: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.step

    @property
    def name(self) -> str:
        return self.cfg.run_name()


def fit_pack(members: list[Member], stacked: bool) -> None:
    """Train every member to its last epoch, the members at the lowest position together."""
    if not members:
        return
    steps = members[0].objective.steps
    total = sum(steps(e) for e in range(members[0].cfg.epochs))
    low = min(m.position for m in members)
    bar = tqdm(total=total, initial=sum(steps(e) for e in range(low[0])) + low[1], dynamic_ncols=True,
               desc=f"pack of {len(members)}", mininterval=1.0)
    with stop_requests() as stops:
        try:
            while True:
                todo = [m for m in members if m.epoch < m.cfg.epochs]
                if not todo:
                    return
                pos = min(m.position for m in todo)
                group = [m for m in todo if m.position == pos]
                ahead = [m.step for m in todo if m.epoch == pos[0] and m.step > pos[1]]
                stop = min(ahead, default=steps(pos[0]))
                train_segment(group, pos[0], pos[1], stop, stacked, stops, bar)
        finally:
            bar.close()


def _pack(group: list[Member], stacked: bool):
    models = [m.model for m in group]
    if stacked:  # the optimizers Accelerate wraps: their own state is what a checkpoint holds
        return StackedPack(models, [getattr(m.optimizer, "optimizer", m.optimizer) for m in group])
    return LoopedPack(models, [m.optimizer for m in group], channels_last=group[0].cfg.channels_last)


def train_segment(group: list[Member], epoch: int, start: int, stop: int, stacked: bool, stops: list,
                  bar) -> None:
    """Steps ``start`` to ``stop`` of ``epoch`` for every member of ``group`` (all at (epoch, start))."""
    cfg, acc = group[0].cfg, group[0].session.accelerator
    lr = cosine_lr(epoch, cfg.epochs, cfg.lr, cfg.eta_min)
    pack = _pack(group, stacked)
    pack.set_lr(lr)
    pack.train()
    streams = [m.objective.batches(epoch, start) for m in group]
    t0, n_img = time.perf_counter(), 0
    for step in range(start, stop):
        batches = [next(s) for s in streams]
        with acc.autocast():
            logits = pack([b["x"] for b in batches])
            out = [m.objective.loss(z, b) for m, z, b in zip(group, logits, batches)]
        acc.backward(sum(loss for loss, _ in out))
        pack.step()
        for m, (_, stats) in zip(group, out):  # tensors stay on the device: no sync per step
            for k, v in stats.items():
                m.sums[k] = m.sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)
            m.step = step + 1
        n_img += batches[0]["x"].shape[0]
        faults.point("pack-step")
        bar.update(1)
        if stops:
            pack.close()
            for m in group:
                m.session.save_checkpoint(m.model, m.optimizer, epoch, m.step, _floats(m.sums), m.history)
            raise Interrupted(stops[0])
    pack.close()
    if stop == group[0].objective.steps(epoch):
        end_epoch(group, epoch, lr, n_img / max(time.perf_counter() - t0, 1e-9), bar)


def end_epoch(group: list[Member], epoch: int, lr: float, img_per_s: float, bar) -> None:
    """Per member, what the engine does after an epoch: metrics row, evaluation, checkpoint, W&B log."""
    for m in group:
        cfg, sums = m.cfg, _floats(m.sums)
        _check_finite(sums["loss"], epoch, m.step)
        row = {names.EPOCH: epoch + 1, names.LR: lr, **m.objective.epoch_metrics(sums),
               names.THROUGHPUT: img_per_s}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            row.update(m.objective.evaluate(m.model))
        m.history.append(row)
        m.session.save_checkpoint(m.model, m.optimizer, epoch + 1, 0, {}, m.history)
        m.epoch, m.step, m.sums = epoch + 1, 0, {}
        faults.point("epoch-saved")
        m.session.log(row, step=epoch + 1)
        shown = {k: round(v, 4) for k, v in row.items() if k.startswith("test/")}
        bar.write(f"{m.name} epoch {epoch + 1}/{cfg.epochs} " + json.dumps(shown))
