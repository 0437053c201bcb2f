"""The distillation objective: a student fits its (ensemble) teacher on real and synthetic images.

The paper's static pool (App. A.3): N = round(r * n_real) synthetic images, labelled once by the teacher
in eval mode, never augmented. Every batch of B holds ceil(B * n_real / (n_real + N)) real images and the
rest synthetic; an epoch is one pass over the real data. The teacher sees exactly the student's augmented
batch: either run on it (stacked ensemble) or, identically, looked up in the cache of all views.
"""

from __future__ import annotations

import contextlib

import torch

from kd.data import Data, apply_views, epoch_generator, sample_views, split_batch
from kd.losses import kd_loss
from kd.metrics import accuracy, agreement, ece, predictive_kl
from kd.models import Ensemble
from kd.objectives import predict


class Distill:
    def __init__(self, data: Data, ensemble: Ensemble, batch_size: int, temperature: float, seed: int,
                 synthetic: torch.Tensor | None = None, cache: torch.Tensor | None = None,
                 autocast=None, rank: int = 0, world: int = 1):
        self.data, self.ensemble, self.temperature, self.seed = data, ensemble, temperature, seed
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.autocast = autocast or contextlib.nullcontext
        self.cache = cache
        dev = data.train_x.device
        self.syn = synthetic.to(dev) if synthetic is not None and len(synthetic) else None
        self.n_syn = 0 if self.syn is None else self.syn.shape[0]
        self.real_b, self.syn_b = split_batch(batch_size, data.n_train, self.n_syn)
        # synthetic images are labelled once, clean, in eval mode
        self.syn_targets = self.teacher_clean(self.syn) if self.syn is not None else None
        self.test_teacher = self.teacher_clean(data.test_x)
        self.teacher_acc = accuracy(self.test_teacher, data.test_y)
        self._logged_teacher = False

    @torch.no_grad()
    def teacher_clean(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        out = []
        for i in range(0, images.shape[0], batch_size):
            x = apply_views(images[i:i + batch_size], None, self.data.spec)
            with self.autocast():
                out.append(self.ensemble(x.contiguous(memory_format=torch.channels_last)).float())
        return torch.cat(out)

    def steps(self, epoch: int) -> int:
        return -(-self.data.n_train // self.real_b)

    def plan(self, epoch: int):
        """Permutations and views of the epoch: a function of (seed, epoch) only."""
        g = epoch_generator(self.seed, epoch, self.data.train_x.device)
        perm = torch.randperm(self.data.n_train, generator=g, device=g.device)
        views = sample_views(self.data.n_train, self.data.spec, g)
        need = self.steps(epoch) * self.syn_b
        if self.n_syn:
            reps = -(-need // self.n_syn)
            syn_perm = torch.cat([torch.randperm(self.n_syn, generator=g, device=g.device) for _ in range(reps)])
        else:
            syn_perm = torch.empty(0, dtype=torch.long, device=g.device)
        return perm, views, syn_perm

    def batches(self, epoch: int, start: int = 0):
        perm, views, syn_perm = self.plan(epoch)
        rb, sb = self.real_b, self.syn_b
        for s in range(start, self.steps(epoch)):
            idx = perm[s * rb:(s + 1) * rb]
            sidx = syn_perm[s * sb:(s + 1) * sb]
            if self.world > 1:
                idx = idx[self.rank::self.world]
                sidx = sidx[self.rank::self.world]
            v = views[idx]
            x = apply_views(self.data.train_x[idx], v, self.data.spec)
            if len(sidx):
                x = torch.cat([x, apply_views(self.syn[sidx], None, self.data.spec)])
            yield {"x": x, "target": self.targets(x, idx, v, sidx)}

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
        loss = kd_loss(logits, t, self.temperature)
        n = t.shape[0]
        agree = (logits.detach().argmax(-1) == t.argmax(-1)).sum()
        return loss, {"loss": loss.detach() * n, "n": n, "agree": agree}

    def epoch_metrics(self, sums: dict) -> dict:
        n = max(sums["n"], 1)
        return {"train/loss": sums["loss"] / n, "train/agreement": sums["agree"] / n}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        logits = predict(model, self.data.test_x, self.data.spec)
        t, y = self.test_teacher, self.data.test_y
        out = {"test/acc": accuracy(logits, y), "test/agreement": agreement(logits, t),
               "test/kl": predictive_kl(logits, t), "test/ece": ece(logits, y)}
        if not self._logged_teacher:
            out["teacher/test_acc"] = self.teacher_acc
            self._logged_teacher = True
        return out
