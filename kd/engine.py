"""The one training loop of teachers and students, plain or packed: they differ in targets and loss, not machinery.

:func:`fit` trains a list of :class:`Member` s, each one run: its session (run folder, checkpoints, W&B run:
:class:`kd.session.Session`), model, optimizer and objective. A plain run is a list of one; a packed grid
(``python -m kd.sweep.pack``) is several, stepped together by a :class:`~kd.steppers.Stepper` (the one hook
in which they differ). An *objective* (:mod:`kd.objectives`) owns the data and the loss (:class:`Objective`).

Positions: every member has its own (epoch, step). Normally all are equal; a pack killed while it saved its
members' checkpoints one by one leaves some a step or an epoch ahead. The loop then trains the members at the
lowest position, alone, until they reach the next one, and steps them together again: a member's numbers
depend only on its own state, so this is what an uninterrupted run computes.

The per-epoch randomness depends on (seed, epoch) only, so a resumed run continues exactly (bitwise on CPU).
W&B steps are epochs. SIGTERM or SIGINT: every member checkpoints at the next step, then
:class:`~kd.errors.Interrupted` (exit 143 / 130); one that arrives after the last step (during the last epoch's
evaluation or checkpoint) stops the run after that checkpoint, before anything is published. With several
processes a stop is agreed (:class:`StopVote`): a signal to any one rank (the W&B UI's stop reaches rank 0 only)
stops every rank after the same step, each with the same exit code; a rank never leaves the loop through a failed
collective.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from kd import faults, names
from kd.checkpoint import state_tensors
from kd.errors import Interrupted, KDError, say, stop_requests
from kd.optim import lr_at
from kd.steppers import Stepper

CHECK_EVERY = 25  # steps between checks that the loss is finite (a host sync)


class StopVote:
    """Whether the ranks stop after this step, the same answer on every rank: the largest signal number any rank
    caught (0: none), all-reduced once per step. The reduction of step s is started at step s and read at step
    s + 1 (one step of slack, no host sync on the step's own work); every rank reads the same steps' votes, so all
    leave the loop after the same step. One process: the local signal list, nothing reduced."""

    def __init__(self, acc, stops: list):
        self.stops, self.pending = stops, None
        self.several = acc.num_processes > 1
        self.device = acc.device

    def _mine(self) -> int:
        return int(self.stops[0]) if self.stops else 0

    def __call__(self) -> int:
        """Called once per step on every rank: the agreed signal number after the previous step's vote, or 0."""
        if not self.several:
            return self._mine()
        import torch.distributed as dist

        agreed = 0
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            agreed = int(flag.item())
        flag = torch.tensor([self._mine()], dtype=torch.int64, device=self.device)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        return agreed

    def now(self) -> int:
        """The agreed signal number at once (one synchronous all-reduce with several processes)."""
        self.settle()
        if not self.several:
            return self._mine()
        self()  # this rank's vote
        agreed = self()  # every rank's
        self.settle()
        return agreed

    def settle(self) -> None:
        """At the end of a segment: the last vote is read (and ignored; the next segment votes anew), so no
        reduction is left in flight."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None


class Objective(Protocol):
    """What a run optimises (:class:`kd.objectives.Supervised`, :class:`kd.objectives.Distill`)."""

    def steps(self, epoch: int) -> int:
        """Steps in that epoch."""

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Batches from step ``start`` on; ``batch["x"]`` is the input."""

    def loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """(loss, sums): sums are additive epoch statistics, e.g. {"loss": ..., "n": B}."""

    def epoch_metrics(self, sums: dict) -> dict:
        """E.g. {"train/loss": ...} from an epoch's sums."""

    def evaluate(self, model) -> dict:
        """Clean test-set metrics."""

    # optional: ``state() -> dict`` of tensors a checkpoint keeps beside model and optimizer, and
    # ``restore_state(tensors)`` that restores them on resume (:mod:`kd.online_synthetic`)


@dataclass
class Member:
    """One run in the loop, at (epoch, step) with the sums of its epoch so far and its per-epoch rows."""

    session: object  # kd.session.Session: cfg, accelerator, tracker, save_checkpoint
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    objective: Objective
    forward: Callable
    epoch: int = 0
    step: int = 0
    sums: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    saved_at: float = field(default_factory=time.monotonic)  # when its last checkpoint was written (or it began)

    @property
    def cfg(self):
        return self.session.cfg

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.step

    def checkpoint(self, last: bool = False) -> None:
        """Model, optimizer and position; ``last``: the run stops here (a stop signal, or its final epoch), so the
        checkpoint is mirrored too."""
        session = self.session
        self.saved_at = time.monotonic()
        if not session.main:
            return
        tensors, info = state_tensors(session.accelerator.unwrap_model(self.model), self.optimizer)
        own = getattr(self.objective, "state", None)  # an objective's own state (online sampling's RNG)
        if own is not None:
            tensors.update(own())
        session.save_checkpoint(tensors, {**info, "epoch": self.epoch, "step": self.step, "sums": floats(self.sums),
                                          "history": self.history}, last=last)


def looped(group: list[Member]) -> Stepper:
    from kd.steppers import LoopedStep

    return LoopedStep([m.model for m in group], [m.optimizer for m in group], [m.forward for m in group],
                      channels_last=group[0].cfg.channels_last)


def fit(members: list[Member], stepper: Callable[[list[Member]], Stepper] = looped, desc: str = "") -> None:
    """Train every member to its last epoch, the members at the lowest position together."""
    steps, cfg = members[0].objective.steps, members[0].cfg
    total = sum(steps(e) for e in range(cfg.epochs))
    low = min(m.position for m in members)
    bar = tqdm(total=total, initial=sum(steps(e) for e in range(low[0])) + low[1], desc=desc or cfg.run_name(),
               disable=not members[0].session.main, dynamic_ncols=True, mininterval=1.0)
    with stop_requests() as stops:
        try:
            while todo := [m for m in members if m.epoch < m.cfg.epochs]:
                pos = min(m.position for m in todo)
                group = [m for m in todo if m.position == pos]
                ahead = [m.step for m in todo if m.epoch == pos[0] and m.step > pos[1]]
                train_segment(group, pos[0], pos[1], min(ahead, default=steps(pos[0])), stepper(group), stops, bar)
            # a stop during the last epoch's evaluation or checkpoint (on any rank): saved, and still a stop
            if signum := StopVote(members[0].session.accelerator, stops).now():
                raise Interrupted(signum)
        finally:
            bar.close()


def train_segment(group: list[Member], epoch: int, start: int, stop: int, stepper: Stepper, stops: list,
                  bar) -> None:
    """Steps ``start`` to ``stop`` of ``epoch`` for every member of ``group`` (all at (epoch, start))."""
    cfg, acc = group[0].cfg, group[0].session.accelerator
    lr = lr_at(epoch, cfg)
    stepper.set_lr(lr)
    stepper.train()
    streams = [m.objective.batches(epoch, start) for m in group]
    t0, n_img = time.perf_counter(), 0
    vote = StopVote(acc, stops)
    for step in range(start, stop):
        batches = [next(s) for s in streams]
        with acc.autocast():
            logits = stepper([b["x"] for b in batches])
            out = [m.objective.loss(z, b) for m, z, b in zip(group, logits, batches)]
        acc.backward(sum(loss for loss, _ in out))
        stepper.step()
        for m, (_, stats) in zip(group, out):  # tensors stay on the device: no sync per step
            for k, v in stats.items():
                m.sums[k] = m.sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)
            m.step = step + 1
        n_img += batches[0]["x"].shape[0]
        faults.point("train-step")
        bar.update(1)
        if (step + 1) % CHECK_EVERY == 0:
            mean = [check_finite(float(m.sums["loss"]) / max(float(m.sums["n"]), 1), epoch, step + 1)
                    for m in group]
            bar.set_postfix(epoch=epoch + 1, loss=f"{sum(mean) / len(mean):.3f}",
                            img_s=f"{n_img * len(group) / (time.perf_counter() - t0):.0f}")
        if signum := vote():
            vote.settle()
            stepper.close()
            for m in group:
                m.checkpoint(last=True)
            if acc.num_processes > 1:  # every rank leaves once the checkpoint is written, with the same code
                acc.wait_for_everyone()
                say(f"rank {acc.process_index}: stopped by {signal.Signals(signum).name} after epoch {epoch + 1} "
                    f"step {step + 1}")
            raise Interrupted(signum)
    vote.settle()
    stepper.close()
    if stop == group[0].objective.steps(epoch):
        img_per_s = n_img * acc.num_processes / max(time.perf_counter() - t0, 1e-9)
        for m in group:
            end_epoch(m, epoch, lr, img_per_s, bar)


def end_epoch(m: Member, epoch: int, lr: float, img_per_s: float, bar) -> None:
    """A member's epoch row (metrics, evaluation), its checkpoint, then its W&B log."""
    cfg, sums = m.cfg, floats(m.sums)
    check_finite(sums["loss"] / max(sums["n"], 1), epoch, m.step)
    row = {names.EPOCH: epoch + 1, names.LR: lr, **m.objective.epoch_metrics(sums), names.THROUGHPUT: img_per_s}
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
        row.update(m.objective.evaluate(m.model))
    m.history.append(row)
    m.epoch, m.step, m.sums = epoch + 1, 0, {}
    last = m.epoch == cfg.epochs
    if last or cfg.checkpoint_every_s <= 0 or time.monotonic() - m.saved_at >= cfg.checkpoint_every_s:
        m.checkpoint(last=last)
    faults.point("epoch-saved")
    m.session.tracker.log(row, step=epoch + 1)
    faults.point("epoch-logged")
    if m.session.main:
        shown = {k: round(v, 4) for k, v in row.items() if k.startswith("test/")}
        bar.write(f"{cfg.run_name()} epoch {epoch + 1}/{cfg.epochs} " + json.dumps(shown))


def floats(sums: dict) -> dict:
    return {k: float(v) for k, v in sums.items()}


def check_finite(loss: float, epoch: int, step: int) -> float:
    if not math.isfinite(loss):
        raise KDError(f"the training loss became {loss} in epoch {epoch + 1} (step {step}): lower --lr, or use "
                      "--mixed_precision=no if fp16 overflowed")
    return loss
