"""One real-size epoch (the data pipeline, the steps, the evaluation, a checkpoint) and the teacher cache.

The epoch runs :class:`kd.objectives.Supervised`'s batches (the engine's permutation, crops and flips on the
device) over random uint8 images of the dataset's size through the student step of the best measured variant,
its target a cached-teacher row per image (a ``[n, classes]`` table, as the cache's gather); then the test
set's evaluation (:func:`kd.objectives.predict`) and one checkpoint (:class:`kd.checkpoint.Checkpoints`). The
cache section builds one teacher's all-view outputs (:func:`kd.teacher_cache.cached_targets`) for
``cache_images`` images and loads them back verified; the full build's seconds are projected from that rate.
"""

from __future__ import annotations

import time

import torch

from kd.bench.steps import loss_of, sgd, variant_named
from kd.bench.timing import synchronize


def random_data(ctx, n: int, n_test: int):
    from kd.data import Data
    from kd.datasets import DATASETS

    w, g = ctx.workload, torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    tx = torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    y, ty = (torch.randint(0, w.classes, (m,), generator=g) for m in (n, n_test))
    return Data(DATASETS[w.dataset], x, y, tx, ty).to(ctx.device)


def timed(device, fn):
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def section_epoch(ctx, student: dict | None) -> dict:
    from kd.accel import StaticCompiled
    from kd.checkpoint import Checkpoints, state_tensors
    from kd.models import build_model
    from kd.objectives import Supervised, predict

    w = ctx.workload
    v = variant_named((student or {}).get("best"))
    data = random_data(ctx, w.n_train, w.n_test)
    torch.manual_seed(0)
    model = build_model(w.arch, w.classes).to(ctx.device).to(memory_format=torch.channels_last).train()
    opt = sgd(model.parameters())
    forward = model if v.mode is None else StaticCompiled(model, None if v.mode == "default" else v.mode)
    table = torch.randn(w.n_train, w.classes, device=ctx.device)
    loss_fn, objective = loss_of("student", w.temperature), Supervised(data, w.batch, seed=0)

    def epoch(e: int) -> int:
        steps = 0
        for batch in objective.batches(e):
            with v.autocast(ctx.device):
                logits = forward(batch["x"].contiguous(memory_format=torch.channels_last))
            loss_fn(logits, table[batch["idx"]]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
        return steps

    warm = [epoch(-1)] if v.mode else []  # a compiled step compiles (and captures) before the timed epoch
    steps, epoch_s = timed(ctx.device, lambda: epoch(0))
    autocast = (lambda: v.autocast(ctx.device)) if v.bf16 else None
    _, eval_s = timed(ctx.device, lambda: predict(model, data.test_x, data.spec, autocast))
    folder = ctx.root / "checkpoint"
    folder.mkdir(exist_ok=True)
    _, ckpt_s = timed(ctx.device, lambda: Checkpoints(folder).save(*state_tensors(model, opt)))
    return {"configuration": f"student step, {v.name}", "n_train": w.n_train, "n_test": w.n_test, "batch": w.batch,
            "steps": steps, "epoch_s": epoch_s, "s_per_step": epoch_s / steps, "eval_s": eval_s,
            "checkpoint_s": ckpt_s, "warm_up_epochs": len(warm),
            "checkpoint_mib": sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20}


def section_cache(ctx) -> dict:
    from kd.models import Ensemble, build_model, weights_sha256
    from kd.teacher_cache import cached_targets

    w = ctx.workload
    data = random_data(ctx, w.cache_images, 8)
    torch.manual_seed(100)
    teacher = build_model(w.teacher_arch, w.classes).to(ctx.device).to(memory_format=torch.channels_last).eval()
    autocast = (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)) if ctx.device.type == "cuda" \
        else None
    folder = ctx.root / "cache"
    folder.mkdir(exist_ok=True)
    h = weights_sha256(teacher)

    def build():
        return cached_targets(Ensemble([teacher]), data, [h], folder, torch.float32, autocast)

    (table, path, built), build_s = timed(ctx.device, build)
    (again, _, rebuilt), load_s = timed(ctx.device, build)
    if not built or rebuilt or not torch.equal(table, again):
        raise RuntimeError("the teacher cache was not built once and then loaded back equal")
    pairs = w.cache_images * data.num_views
    full = w.n_train * data.num_views
    return {"images": w.cache_images, "views": data.num_views, "build_s": build_s,
            "build_img_views_per_s": pairs / build_s, "load_s": load_s,
            "file_mib": path.stat().st_size / 2**20, "load_mib_per_s": path.stat().st_size / 2**20 / load_s,
            "projected_full_build_s": full / (pairs / build_s),
            "projected_full_load_s": full / pairs * load_s,
            "projection": f"{w.n_train} images x {data.num_views} views at the measured build and load rates"}
