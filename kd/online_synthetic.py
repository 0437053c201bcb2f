"""The online synthetic protocol (``--synthetic_mode=online``): fresh generator samples in every step.

The static protocol (:class:`kd.objectives.Distill`, Figure 1) draws a pool of round(s * n_real) images once. Online,
as in the authors' final code, each step of B images holds ``int(r * B)`` synthetic rows sampled afresh from the
generator under ``no_grad``, with r = s / (1 + s) the synthetic share of the data (s = ``--synthetic_ratio``), and
B - int(r * B) real rows: the static split of the same s (s = 0.25, 0.5, 0.75, 1 at B = 128: 25, 42, 54, 64
synthetic rows). An epoch is still one pass over the real data. The teacher(s) run on the fresh rows (the teacher
cache serves the real rows only); the synthetic rows are distilled at their own temperature
(``--synthetic_temperature``, default ``--temperature``): the batch carries each row's tau (:mod:`kd.losses`).

The latents come from the run's own :class:`torch.Generator`, seeded from the run's seed; with
``--synthetic_generator_bn=train`` (the authors' mode) the SN-GAN's BatchNorm normalises by the batch and updates
its running statistics. Both the RNG state and those statistics are tensors of the run's checkpoint
(:meth:`OnlineDistill.state`), so a killed run resumes bitwise like a static one. A diffusion model is sampled
through its sampler with a seed drawn from that RNG per step (one reverse process per step: slow).
"""

from __future__ import annotations

from fractions import Fraction

import torch

from kd.data import Data, apply_views, rank_part, step_batches
from kd.generators.sampling import derived_seed, to_pixels
from kd.objectives import Distill

RNG_KEY = "online.rng"
BN_PREFIX = "online.generator."


def online_split(batch_size: int, ratio: float) -> tuple[int, int]:
    """(real rows, synthetic rows) of a step: int(r * B) synthetic, r = s / (1 + s), computed exactly."""
    s = Fraction(ratio).limit_denominator(1_000_000)
    syn = int(batch_size * s / (1 + s))
    return batch_size - syn, syn


def online_seed(run_seed: int) -> int:
    """The seed of a run's online sampling RNG: a function of the run's seed only."""
    return derived_seed("synthetic-online", run_seed)


class FreshSamples:
    """``sampler`` (:class:`kd.generators.Sampler`) drawn from one RNG: ``take(k)`` gives k fresh uint8 images."""

    def __init__(self, sampler, seed: int, bn: str, size: int):
        self.sampler, self.bn, self.size = sampler, bn, size
        self.rng = torch.Generator("cpu").manual_seed(seed)
        self.module = getattr(sampler, "g", None)  # an SN-GAN's generator; None for a diffusion model

    @torch.no_grad()
    def take(self, k: int) -> torch.Tensor:
        if self.module is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.rng))
            x = self.sampler(range(k), seed)
        else:
            g = self.module
            z = torch.randn(k, g.z_dim, generator=self.rng).to(self.sampler.device)
            g.train(self.bn == "train")
            x = g(z).clamp(-1.0, 1.0)
            g.eval()
        return to_pixels(x.float(), self.size, self.size)

    def state(self) -> dict:
        out = {RNG_KEY: self.rng.get_state().clone()}
        if self.module is not None:
            out.update({f"{BN_PREFIX}{k}": v.detach().clone() for k, v in self.module.named_buffers()})
        return out

    def restore_state(self, tensors: dict) -> None:
        self.rng.set_state(tensors[RNG_KEY].to("cpu", torch.uint8))
        if self.module is not None:
            for k, v in self.module.named_buffers():
                v.copy_(tensors[f"{BN_PREFIX}{k}"].to(v.device))


class OnlineDistill(Distill):
    """:class:`kd.objectives.Distill` with fresh synthetic rows every step in place of a static pool."""

    def __init__(self, cfg, data: Data, ensemble, fresh: FreshSamples, cache: torch.Tensor | None = None, acc=None):
        super().__init__(cfg, data, ensemble, None, cache, acc)
        self.fresh = fresh
        self.real_b, self.syn_b = online_split(self.batch_size, cfg.synthetic_ratio)
        self.syn_tau = cfg.synthetic_temperature or cfg.temperature

    def batches(self, epoch: int, start: int = 0):
        _, perm, views = self.draw(epoch)
        real = step_batches(perm, self.real_b, self.rank, self.world)
        for s in range(start, self.steps(epoch)):
            idx = real[s]
            x, y = self.images(idx, views), self.data.train_y[idx]
            n_syn = 0
            if self.syn_b:  # every rank draws the step's rows from the same RNG and keeps its own part
                fresh = rank_part(self.fresh.take(self.syn_b).to(x.device), self.rank, self.world)
                xs = apply_views(fresh, None, self.data.spec)
                n_syn = len(xs)
                x = torch.cat([x, xs])
                y = torch.cat([y, y.new_full((n_syn,), -1)])  # a generator's images have no label
            batch = {"x": x, "y": y, "target": self.online_targets(x, idx, views[idx], n_syn)}
            if self.syn_tau != self.cfg.temperature:
                batch["tau"] = torch.cat([torch.full((len(idx),), float(self.cfg.temperature)),
                                          torch.full((n_syn,), float(self.syn_tau))]).to(x.device)
            yield batch

    @torch.no_grad()
    def online_targets(self, x, idx, views, n_syn: int) -> torch.Tensor:
        if self.cache is None or not n_syn:
            return self.targets(x, idx, views, ())
        with self.autocast():
            fresh = self.ensemble(x[-n_syn:].contiguous(memory_format=torch.channels_last)).float()
        return torch.cat([self.cache[idx, views].float(), fresh])

    def state(self) -> dict:
        """The tensors a checkpoint keeps beyond model and optimizer: the RNG and the generator's statistics."""
        return self.fresh.state()

    def restore_state(self, tensors: dict) -> None:
        self.fresh.restore_state(tensors)
