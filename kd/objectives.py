"""What a training step optimises, side by side: a teacher's cross-entropy and a student's distillation.

Both draw an epoch the same way (:class:`Epochs`: a permutation and one view id per image, a function of
(seed, epoch) only) and cut it into steps with :func:`kd.data.step_batches` (each rank takes its contiguous
part of a step's batch). Both satisfy :class:`kd.engine.Objective`, the protocol the loop calls.

The student's static pool (paper App. A.3): N = round(r * n_real) synthetic images, labelled once by the
teacher in eval mode, never augmented. Every batch of B holds ceil(B * n_real / (n_real + N)) real images and
the rest synthetic; an epoch is one pass over the real data. The teacher sees exactly the student's augmented
batch: either run on it (the ensemble, fused on accelerators) or, identically, looked up in the cache of all views.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from kd import names
from kd.data import Data, apply_views, epoch_generator, rank_part, sample_views, split_batch, step_batches
from kd.losses import LOSSES
from kd.metrics import accuracy, agreement, ece, predictive_kl


def parallel(acc) -> tuple:
    """(autocast, rank, world) of an Accelerator, or of one plain process when ``acc`` is None."""
    if acc is None:
        return contextlib.nullcontext, 0, 1
    return acc.autocast, acc.process_index, acc.num_processes


@torch.no_grad()
def predict(model, images: torch.Tensor, spec, autocast=None, batch_size: int = 1000) -> torch.Tensor:
    """Eval-mode outputs (float32) for clean uint8 images; restores the model's train/eval mode."""
    was = model.training
    model.eval()
    ctx = autocast or contextlib.nullcontext
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = apply_views(images[i:i + batch_size], None, spec).contiguous(memory_format=torch.channels_last)
        with ctx():
            out.append(model(x).float())
    model.train(was)
    return torch.cat(out) if out else torch.empty(0)


class Epochs:
    """The real training images of an epoch: permutation and views from (seed, epoch) only."""

    def __init__(self, data: Data, seed: int, rank: int = 0, world: int = 1):
        self.data, self.seed, self.rank, self.world = data, seed, rank, world

    def draw(self, epoch: int):
        """(generator, permutation, views); the generator continues for whatever else the epoch draws."""
        g = epoch_generator(self.seed, epoch, self.data.train_x.device)
        perm = torch.randperm(self.data.n_train, generator=g, device=g.device)
        return g, perm, sample_views(self.data.n_train, self.data.spec, g)

    def images(self, idx: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return apply_views(self.data.train_x[idx], views[idx], self.data.spec)


class Supervised(Epochs):
    """Cross-entropy on augmented real images; an epoch is one pass over the training set."""

    def __init__(self, data: Data, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        super().__init__(data, seed, rank, world)
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, cfg, data: Data, acc=None) -> Supervised:
        _, rank, world = parallel(acc)
        return cls(data, cfg.batch_size, cfg.run_seed, rank, world)

    def steps(self, epoch: int) -> int:
        return -(-self.data.n_train // self.batch_size)

    def batches(self, epoch: int, start: int = 0):
        _, perm, views = self.draw(epoch)
        for idx in step_batches(perm, self.batch_size, self.rank, self.world)[start:]:
            yield {"x": self.images(idx, views), "y": self.data.train_y[idx], "idx": idx, "views": views[idx]}

    def loss(self, logits, batch):
        loss = F.cross_entropy(logits.float(), batch["y"])
        n = batch["y"].numel()
        return loss, {"loss": loss.detach() * n, "n": n}

    def epoch_metrics(self, sums: dict) -> dict:
        return {names.TRAIN_LOSS: sums["loss"] / max(sums["n"], 1)}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        return {names.TEST_ACC: accuracy(predict(model, self.data.test_x, self.data.spec), self.data.test_y)}


class Distill(Epochs):
    """A student fits its (ensemble) teacher's outputs on real and synthetic images with the loss ``cfg.loss``
    (:data:`kd.losses.LOSSES`; the paper's Eq. 1 by default), at the run's batch size, temperature and seed."""

    def __init__(self, cfg, data: Data, ensemble, synthetic: torch.Tensor | None = None,
                 cache: torch.Tensor | None = None, acc=None):
        self.autocast, rank, world = parallel(acc)
        super().__init__(data, cfg.run_seed, rank, world)
        self.cfg, self.ensemble, self.batch_size = cfg, ensemble, cfg.batch_size
        self.loss_fn = LOSSES[cfg.loss]
        self.cache = cache
        self.syn = synthetic.to(data.train_x.device) if synthetic is not None and len(synthetic) else None
        self.n_syn = 0 if self.syn is None else self.syn.shape[0]
        self.real_b, self.syn_b = split_batch(self.batch_size, data.n_train, self.n_syn)
        # synthetic images are labelled once, clean, in eval mode
        self.syn_targets = self.teacher_clean(self.syn) if self.syn is not None else None
        self.test_teacher = self.teacher_clean(data.test_x)
        self.teacher_acc = accuracy(self.test_teacher, data.test_y)
        self.teacher_acc_logged = False  # logged once, with the first evaluation

    def teacher_clean(self, images: torch.Tensor) -> torch.Tensor:
        return predict(self.ensemble, images, self.data.spec, self.autocast)

    def steps(self, epoch: int) -> int:
        return -(-self.data.n_train // self.real_b)

    def plan(self, epoch: int):
        """Permutations and views of the epoch: a function of (seed, epoch) only."""
        g, perm, views = self.draw(epoch)
        need = self.steps(epoch) * self.syn_b
        if self.n_syn:
            reps = -(-need // self.n_syn)
            syn_perm = torch.cat([torch.randperm(self.n_syn, generator=g, device=g.device) for _ in range(reps)])
        else:
            syn_perm = torch.empty(0, dtype=torch.long, device=g.device)
        return perm, views, syn_perm

    def batches(self, epoch: int, start: int = 0):
        perm, views, syn_perm = self.plan(epoch)
        real = step_batches(perm, self.real_b, self.rank, self.world)
        for s in range(start, self.steps(epoch)):
            idx = real[s]
            sidx = rank_part(syn_perm[s * self.syn_b:(s + 1) * self.syn_b], self.rank, self.world)
            x, y = self.images(idx, views), self.data.train_y[idx]
            if len(sidx):
                x = torch.cat([x, apply_views(self.syn[sidx], None, self.data.spec)])
                y = torch.cat([y, y.new_full((len(sidx),), -1)])  # a generator's images have no label
            yield {"x": x, "y": y, "target": self.targets(x, idx, views[idx], sidx)}

    @torch.no_grad()
    def targets(self, x, idx, views, sidx) -> torch.Tensor:
        if self.cache is None:  # the teacher sees exactly the student's (mixed) batch
            with self.autocast():
                return self.ensemble(x.contiguous(memory_format=torch.channels_last)).float()
        t = self.cache[idx, views].float()
        if len(sidx):
            t = torch.cat([t, self.syn_targets[sidx]])
        return t

    def loss(self, logits, batch):
        t = batch["target"]
        loss = self.loss_fn(logits, batch, self.cfg)
        n = t.shape[0]
        agree = (logits.detach().argmax(-1) == t.argmax(-1)).sum()
        return loss, {"loss": loss.detach() * n, "n": n, "agree": agree}

    def epoch_metrics(self, sums: dict) -> dict:
        n = max(sums["n"], 1)
        return {names.TRAIN_LOSS: sums["loss"] / n, names.TRAIN_AGREEMENT: sums["agree"] / n}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        logits = predict(model, self.data.test_x, self.data.spec)
        t, y = self.test_teacher, self.data.test_y
        out = {names.TEST_ACC: accuracy(logits, y), names.TEST_AGREEMENT: agreement(logits, t),
               names.TEST_KL: predictive_kl(logits, t), names.TEST_ECE: ece(logits, y)}
        if not self.teacher_acc_logged:
            out[names.TEACHER_ACC] = self.teacher_acc
            self.teacher_acc_logged = True
        return out
