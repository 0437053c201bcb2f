"""The training sections: teacher training (engine, bare step, paper loop), distillation from m teachers
(cache, teachers every step, teacher-free, paper loop), and the m-member ensemble forward (stacked vs loop)."""

from __future__ import annotations

import contextlib
import io

import torch

from kd.bench.common import TEMPERATURE, Bench, amp, interleave, medians, random_data, ratio, sync, teachers, timed
from kd.bench.loops import Bare, Engine, Paper, engine_cfg
from kd.bench.table import note, row


def bench_training(b: Bench) -> dict:
    from kd.objectives import Supervised

    sizes = b.sizes
    data = random_data(sizes.n_teacher, b.device, seed=1)
    made = list(Supervised(data, sizes.teacher_batch, seed=0).batches(0))
    engine = Engine(sizes, b.device, "teacher", sizes.teacher_batch,
                    lambda s: Supervised(data, sizes.teacher_batch, seed=0), b.root, b.compile)
    bare = Bare(sizes.arch, made, b.device, b.compile)
    paper = Paper(sizes.arch, data, sizes.teacher_batch, b.device)
    s = interleave({"engine": engine.round, "bare": lambda: bare.round(sizes.bare_steps),
                    "paper": lambda: paper.round(sizes.paper_steps)}, sizes.rounds)
    med = medians(s)
    b.add(row("train step: engine vs bare fwd/bwd/step", med["engine"], med["bare"], ratio(s, "engine", "bare"),
              "overhead"),
          row("teacher training: engine vs paper loop", med["engine"], med["paper"], ratio(s, "engine", "paper"),
              None))
    return {"samples_img_s": s, "batch": sizes.teacher_batch, "n_train": sizes.n_teacher, "compile": b.compile}


def bench_distill(b: Bench) -> dict:
    data = random_data(b.sizes.n_distill, b.device, seed=2)
    return {f"m{m}": distill_m(b, m, data) for m in b.sizes.distilled()}


def build_cache(b: Bench, members: list, data) -> tuple[torch.Tensor, float, int]:
    """The ensemble's targets through kd.teacher_cache (per-member files under b.root, shared across m):
    (targets, seconds, members computed)."""
    from kd.bench.common import weights_hash
    from kd.models import Ensemble
    from kd.session import Session
    from kd.teacher_cache import cached_targets

    folder = b.root / "_cache"
    folder.mkdir(exist_ok=True)
    autocast = Session(engine_cfg(b.sizes, b.device, "student", b.sizes.distill_batch, b.root, False),
                       job="bench").accelerator.autocast
    hashes = [weights_hash(t) for t in members]
    before = len(list(folder.glob("*.safetensors")))
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        (cache, _, _), seconds = timed(lambda: cached_targets(Ensemble(members), data, hashes, folder,
                                                              torch.float32, autocast), b.device)
    return cache, seconds, len(list(folder.glob("*.safetensors"))) - before


def distill_m(b: Bench, m: int, data) -> dict:
    from kd.config import DistillConfig
    from kd.models import Ensemble
    from kd.objectives import Distill, Supervised

    sizes, device, bs = b.sizes, b.device, b.sizes.distill_batch
    members = teachers(m, sizes.arch, device)
    ens = Ensemble(members)
    cache, build_s, computed = build_cache(b, members, data)

    def distill(table):
        cfg = DistillConfig(batch_size=bs, temperature=TEMPERATURE, seed=0)
        return lambda session: Distill(cfg, data, ens, cache=table, acc=session.accelerator)

    with_cache = Engine(sizes, device, "student", bs, distill(cache), b.root, b.compile)
    without = Engine(sizes, device, "student", bs, distill(None), b.root, b.compile)
    free = Engine(sizes, device, "student", bs, lambda session: Supervised(data, bs, seed=0), b.root, b.compile)
    paper = Paper(sizes.arch, data, bs, device, members)
    s = interleave({"cache": with_cache.round, "teachers": without.round, "free": free.round,
                    "paper": lambda: paper.round(sizes.paper_steps)}, sizes.rounds)
    med = medians(s)
    saved = bs / med["teachers"] - bs / med["cache"]  # seconds a step saves
    # the build covers n x V outputs; without it the teachers see the n images once an epoch (n / b steps)
    break_even = build_s / (saved * sizes.n_distill / bs) if saved > 0 else float("inf")
    pairs = sizes.n_distill * data.num_views
    rate = pairs * computed / build_s if computed else float("nan")
    b.add(row(f"distill m={m}: engine (cache) vs paper loop", med["cache"], med["paper"], ratio(s, "cache", "paper"),
              f"distill-paper-m{m}"),
          row(f"distill m={m}: cache vs teachers each step", med["cache"], med["teachers"],
              ratio(s, "cache", "teachers"), None),
          row(f"distill m={m}: cache vs teacher-free step", med["cache"], med["free"], ratio(s, "cache", "free"),
              f"cache-vs-free-m{m}"),
          note(f"cache build m={m} (one-off, per member)", f"{build_s:.1f} s", f"{pairs} img x {computed} new",
               f"{rate:.0f} fwd/s" if computed else "shared", f"pays off: {break_even:.1f} ep"))
    return {"samples_img_s": s, "cache_build_s": build_s, "cache_pairs": pairs, "members_computed": computed,
            "members_shared": m - computed, "cache_member_forwards_per_s": rate,
            "cache_break_even_epochs": break_even, "cache_mib": cache.numel() * cache.element_size() / 2**20,
            "batch": bs, "compile": b.compile}


def ensemble_rate(ens, x, device, reps: int = 3):
    def run() -> float:
        with amp(device):
            ens(x)
        sync(device)

        def reps_() -> None:
            for _ in range(reps):
                with amp(device):
                    ens(x)

        return reps * x.shape[0] / timed(reps_, device)[1]
    return run


def bench_ensemble(b: Bench) -> dict:
    from kd.models import Ensemble

    x = torch.randn(b.sizes.distill_batch, 3, 32, 32, device=b.device).contiguous(memory_format=torch.channels_last)
    out = {}
    for m in b.sizes.forwards():
        members = teachers(m, b.sizes.arch, b.device)
        s = interleave({"stacked": ensemble_rate(Ensemble(members, stacked=True), x, b.device),
                        "loop": ensemble_rate(Ensemble(members, stacked=False), x, b.device)}, b.sizes.rounds)
        med = medians(s)
        out[f"m{m}"] = s
        b.add(row(f"ensemble m={m} forward: stacked vs loop", med["stacked"], med["loop"],
                  ratio(s, "stacked", "loop"), None))
    return out
