"""``python -m kd.bench``: the sections in priority order under the run's budget, the JSON after every one."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kd.bench.settings import BenchSettings, Workload, find_spec, workload
from kd.bench.timing import Clock, Record, Timer, machine
from kd.errors import KDError, cli

# (name, seconds it needs on a GPU at the study's sizes, before it starts): the order is the priority
SECTIONS = (("student", 20), ("teacher", 20), ("packs", 40), ("processes", 0), ("epoch", 60), ("cache", 30))
SMOKE_SCALE = 0.05  # the smoke sizes' share of those seconds


@dataclass
class Context:
    settings: BenchSettings
    workload: Workload
    device: torch.device
    timer: Timer
    clock: Clock
    root: Path  # a temporary folder: checkpoints, cache files
    record: Record
    scale: float  # sizes' seconds relative to a GPU at the study's sizes

    def partial(self, name: str, result: dict) -> None:
        """A section's measurements so far, saved (a run killed inside the section keeps them)."""
        self.record.data["sections"][name] = {**result, "partial": True}
        self.record.save()

    def say(self, line: str) -> None:
        print(f"[{self.clock.elapsed():5.0f} s] {line}", flush=True)


def resolve(s: BenchSettings) -> tuple[torch.device, float, float]:
    """(device, budget seconds, timed seconds a measurement) for the flags on this machine."""
    want = "cpu" if s.smoke else s.device
    if want == "cuda" and not torch.cuda.is_available():
        raise KDError("--device=cuda but torch sees no CUDA device: run on a GPU machine, or with --device=cpu")
    if s.smoke and s.device == "cuda":
        raise KDError("--smoke runs on the CPU: leave out --device=cuda, or --smoke")
    device = torch.device("cuda" if want == "auto" and torch.cuda.is_available() else want.replace("auto", "cpu"))
    budget = s.budget_s if s.budget_s >= 0 else 45.0 if s.smoke else 420.0
    min_s = s.min_s if s.min_s >= 0 else 0.05 if s.smoke else 2.0 if device.type == "cuda" else 1.0
    return device, budget, min_s


def run_section(ctx: Context, name: str) -> dict:
    from kd.bench import epoch, packs, steps

    done = ctx.record.data["sections"]
    if name == "student":
        return steps.section_steps(ctx, name)
    if name == "teacher":  # the eager variants and the student's fastest: one more compilation at most
        best = (done.get("student") or {}).get("best")
        return steps.section_steps(ctx, name, only=[steps.FP32.name, steps.BF16.name, best])
    if name == "packs":
        return packs.section_packs(ctx)
    if name == "processes":
        return packs.section_processes(ctx, done.get("student"))
    if name == "epoch":
        return epoch.section_epoch(ctx, done.get("student"))
    return epoch.section_cache(ctx)


def need_s(ctx: Context, name: str, need: float) -> float:
    """Seconds the section needs: from the measured step rates where they exist (the epoch: a real-size pass
    at the student's best rate, twice where it compiles first; the cache: its teacher forwards at a third of a
    teacher step's cost), else the default ``need`` at the run's sizes."""
    done, w = ctx.record.data["sections"], ctx.workload
    rate = {k: (done.get(k) or {}).get("variants", {}).get((done.get(k) or {}).get("best") or "", {})
            for k in ("student", "teacher")}
    if name == "epoch" and rate["student"]:
        passes = 1 if (done["student"]["best"] or "").endswith("eager") else 2
        return passes * -(-w.n_train // w.batch) * rate["student"]["s_per_step"] + need * ctx.scale / 4
    if name == "cache" and rate["teacher"]:
        return 1.5 * w.cache_images * 162 * rate["teacher"]["s_per_step"] / w.teacher_batch / 3 + need * ctx.scale / 4
    return need * ctx.scale


def run_all(ctx: Context) -> None:
    for name, need in SECTIONS:
        need_s_ = need_s(ctx, name, need)
        if not ctx.clock.fits(need_s_):
            reason = f"over budget: {ctx.clock.left():.0f} s of {ctx.clock.budget:.0f} s left, needs about " \
                     f"{need_s_:.0f} s"
            ctx.record.skip(name, reason)
            ctx.say(f"{name}: skipped, {reason}")
            continue
        ctx.say(f"{name} ...")
        result = run_section(ctx, name)
        ctx.record.section(name, {**result, "seconds": ctx.clock.elapsed()})


def main(argv=None) -> None:
    from kd.bench.projection import project, table
    from kd.flags import parse_flags

    with cli():
        s = parse_flags(BenchSettings, argv)
        device, budget, min_s = resolve(s)
        w = workload(s)
        threads = s.threads or (1 if s.smoke else 0)  # tiny networks run fastest on one thread
        if threads and device.type == "cpu":
            torch.set_num_threads(threads)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        os.environ["WANDB_MODE"] = "disabled"
        record = Record(s.out, {"machine": machine(device), "settings": asdict(s), "workload": asdict(w),
                                "budget_s": budget, "min_s": min_s})
        record.save()
        clock = Clock(budget)
        print(f"kd.bench on {record.data['machine'].get('gpu') or record.data['machine']['cpu']}: student "
              f"{w.arch} batch {w.batch}, teacher {w.teacher_arch} batch {w.teacher_batch}"
              + (f"; budget {budget:.0f} s" if budget else ""), flush=True)
        scale = SMOKE_SCALE if s.smoke else 1.0
        with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
            timer = Timer(device, min_s, warmup=1, span=2, min_spans=2) if s.smoke else Timer(device, min_s)
            ctx = Context(s, w, device, timer, clock, Path(tmp), record, scale)
            run_all(ctx)
        from kd.datasets import DATASETS

        proj = project(find_spec(s.spec), record.data["sections"], DATASETS[w.dataset].n_train)
        if s.smoke:
            proj["note"] = "--smoke: the rates of the smoke sizes, not the study's"
        record.data["projection"] = proj
        record.data["seconds"] = clock.elapsed()
        record.save()
        print(table(proj))
        print(f"wrote {s.out} in {clock.elapsed():.0f} s" + (
            f"; skipped: {', '.join(record.data['skipped'])}" if record.data["skipped"] else ""))
        sys.stdout.flush()
