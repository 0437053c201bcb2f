"""Objectives: what a training step optimises. Teachers: cross-entropy on labels (this file).
Students: the distillation objective in :mod:`kd.distill`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.data import Data, apply_views, epoch_generator, sample_views, shard


class Supervised:
    """Cross-entropy on augmented real images; an epoch is one pass over the training set."""

    def __init__(self, data: Data, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.data, self.batch_size, self.seed, self.rank, self.world = data, batch_size, seed, rank, world

    def steps(self, epoch: int) -> int:
        return -(-self.data.n_train // self.batch_size)

    def plan(self, epoch: int):
        """The epoch's permutation and view ids: a function of (seed, epoch) only."""
        g = epoch_generator(self.seed, epoch, self.data.train_x.device)
        perm = torch.randperm(self.data.n_train, generator=g, device=g.device)
        views = sample_views(self.data.n_train, self.data.spec, g)
        return perm, views

    def batches(self, epoch: int, start: int = 0):
        perm, views = self.plan(epoch)
        for idx in shard(perm, self.rank, self.world, self.batch_size)[start:]:
            x = apply_views(self.data.train_x[idx], views[idx], self.data.spec)
            yield {"x": x, "y": self.data.train_y[idx], "idx": idx, "views": views[idx]}

    def loss(self, logits, batch):
        loss = F.cross_entropy(logits.float(), batch["y"])
        n = batch["y"].numel()
        return loss, {"loss": loss.detach() * n, "n": n}

    def epoch_metrics(self, sums: dict) -> dict:
        return {"train/loss": sums["loss"] / max(sums["n"], 1)}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        logits = predict(model, self.data.test_x, self.data.spec)
        return {"test/acc": (logits.argmax(1) == self.data.test_y).float().mean().item()}


@torch.no_grad()
def predict(model, images: torch.Tensor, spec, batch_size: int = 1000) -> torch.Tensor:
    """Eval-mode logits (float32) for clean uint8 images; restores the model's train/eval mode."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = apply_views(images[i:i + batch_size], None, spec).contiguous(memory_format=torch.channels_last)
        out.append(model(x).float())
    model.train(was)
    return torch.cat(out)
