"""The training steps the study takes, built the way the engine builds them, and what the profiler says of them.

A step is one optimizer step of a PreResNet in channels_last on a batch made beforehand (the data pipeline is
timed in the epoch section): the student's is Eq. 1 against cached teacher outputs (a ``[B, classes]`` table
read), the teacher's is cross-entropy. Variants: fp32 eager, bf16 autocast eager, bf16 compiled with static
shapes (:class:`kd.accel.StaticCompiled`, torch.compile's default mode) and bf16 with CUDA graphs (mode
reduce-overhead). The SGD is :func:`kd.optim.optimizer`'s (the paper's: momentum 0.9, Nesterov, weight decay).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Variant:
    name: str
    bf16: bool
    mode: str | None = None  # torch.compile mode (None: eager)

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()


FP32 = Variant("fp32 eager", False)
BF16 = Variant("bf16 eager", True)
VARIANTS = (FP32, BF16, Variant("bf16 compiled", True, "default"),
            Variant("bf16 CUDA graphs", True, "reduce-overhead"))
HYPER = SimpleNamespace(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)


def plain_precision(device: torch.device) -> Variant:
    """Eager packs and epochs run bf16 on CUDA, fp32 elsewhere (a CPU's bf16 is emulated and slower)."""
    return BF16 if device.type == "cuda" else FP32


def sgd(params):
    from kd.optim import optimizer

    return optimizer(list(params), HYPER)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def loss_of(kind: str, temperature: float):
    from kd.losses import kd_loss

    if kind == "student":
        return lambda logits, target: kd_loss(logits, target, temperature)
    return lambda logits, target: F.cross_entropy(logits.float(), target)


def targets(kind: str, shape: tuple, classes: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(1)
    if kind == "student":
        return torch.randn(*shape, classes, generator=g).to(device)
    return torch.randint(0, classes, shape, generator=g).to(device)


def model_step(arch: str, classes: int, batch: int, device: torch.device, variant: Variant, kind: str = "student",
               temperature: float = 1.0):
    """(step, model, optimizer): one training step of a fresh ``arch`` on a fixed random batch."""
    from kd.accel import StaticCompiled
    from kd.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, classes).to(device).to(memory_format=torch.channels_last).train()
    opt = sgd(model.parameters())
    forward = model if variant.mode is None else StaticCompiled(
        model, None if variant.mode == "default" else variant.mode)
    x = channels_last(torch.randn(batch, 3, 32, 32, device=device))
    target, loss_fn = targets(kind, (batch,), classes, device), loss_of(kind, temperature)

    def step() -> None:
        with variant.autocast(device):
            logits = forward(x)
        loss_fn(logits, target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model, opt


def busy_union(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time in which at least one kernel ran."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile(step, device: torch.device, s_per_step: float, steps: int = 5) -> dict:
    """Kernels per step and the GPU-busy fraction (kernel time, overlaps once, over the timed step's seconds)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize(device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy_s = busy_union([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6 / steps
    return {"kernels_per_step": len(kernels) / steps, "gpu_busy_s_per_step": busy_s,
            "gpu_busy_fraction": min(1.0, busy_s / s_per_step)}


def time_step(ctx, step, batch: int, compiled: bool) -> dict:
    t = ctx.timer.per_step(step, warmup=6 if compiled else None)
    out = {"s_per_step": t["s"], "img_per_s": batch / t["s"], "steps_timed": t["steps"], "spans_s": t["spans"]}
    if ctx.device.type == "cuda":
        out.update(profile(step, ctx.device, t["s"]))
    return out


def variants(ctx) -> list:
    """The variants this run times, and (name, reason) for those it leaves out."""
    compile_on = ctx.settings.compile == "True" or (ctx.settings.compile == "auto" and ctx.device.type == "cuda")
    run, left = [], []
    for v in VARIANTS:
        if v.mode and not compile_on:
            left.append((v.name, "not compiled on the CPU unless --compile=True (a CPU compiles for minutes)"))
        elif v.mode == "reduce-overhead" and ctx.device.type != "cuda":
            left.append((v.name, "CUDA graphs need a CUDA device"))
        else:
            run.append(v)
    return run, left


NEED_S = {None: 5.0, "default": 60.0, "reduce-overhead": 60.0}  # a variant's seconds on a GPU, warm-up included


def section_steps(ctx, kind: str, only: list | None = None) -> dict:
    """Every variant of the ``kind`` step ('student' or 'teacher'): rates, and on CUDA the profiler's figures."""
    w = ctx.workload
    arch, batch = (w.arch, w.batch) if kind == "student" else (w.teacher_arch, w.teacher_batch)
    run, left = variants(ctx)
    out = {"arch": arch, "batch": batch, "variants": {}, "left_out": dict(left)}
    for v in [v for v in run if only is not None and v.name not in only]:
        out["left_out"][v.name] = "not the student's fastest: the teacher times the eager steps and that one"
    for v in run if only is None else [v for v in run if v.name in only]:
        need = NEED_S[v.mode] * ctx.scale
        if not ctx.clock.fits(need):
            out["left_out"][v.name] = f"over budget: {ctx.clock.left():.0f} s left, needs about {need:.0f} s"
            continue
        step, _, _ = model_step(arch, w.classes, batch, ctx.device, v, kind, w.temperature)
        out["variants"][v.name] = time_step(ctx, step, batch, v.mode is not None)
        ctx.partial(kind, out)
        ctx.say(f"{kind} step {v.name}: {out['variants'][v.name]['img_per_s']:.0f} img/s")
    out["best"] = best(out)
    return out


def best(result: dict) -> str | None:
    rates = {k: v["s_per_step"] for k, v in result["variants"].items()}
    return min(rates, key=rates.get) if rates else None


def variant_named(name: str | None) -> Variant:
    return next((v for v in VARIANTS if v.name == name), FP32)
