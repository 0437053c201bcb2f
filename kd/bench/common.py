"""What every section of the benchmark shares: sizes per device, the machine, random data, interleaved timing."""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Sizes:
    arch: str  # students and teachers
    teacher_batch: int  # teacher training
    distill_batch: int
    n_teacher: int  # training images of the teacher-training comparison
    n_distill: int  # training images of distillation (the cache holds n_distill x 162 teacher outputs)
    epochs: int  # engine epochs per round; the first is warm-up
    bare_steps: int
    paper_steps: int
    rounds: int
    ensemble_sizes: tuple = (1, 3, 12)  # the distillation and ensemble-forward comparisons
    distill_sizes: tuple = ()  # ensembles distilled from; empty: ensemble_sizes
    forward_sizes: tuple = ()  # stacked-vs-loop ensembles; empty: ensemble_sizes
    cache_images: int = 16  # images (x 162 views) of the per-member vs per-ensemble cache-build comparison
    cache_sizes: tuple = (3,)  # ensembles built the old way (one stacked pass per ensemble) in that comparison
    load_mib: int = 16  # size of the file the cache load + verify rate is timed on
    gen_batch: int = 8
    gen_steps: tuple = (10, 25)
    gen_rounds: int = 2
    gen_big_batch: int = 0  # DDIM at the pool's step count with a larger batch too (0: no)
    pool_steps: int = 100  # the pool recipe: DDIM, 100 steps
    unet: str = "digits"  # a generator recipe of kd.synthetic's presets
    compile_modes: tuple = ("default",)  # torch.compile modes of the compile section (kd.accel.MODES)
    compile_epochs: int = 3
    compile_steps: int = 4  # full steps an epoch of the compile section (and one short last batch)
    pack_sizes: tuple = ()  # the pack section's k (students a pack trains at once); empty: no pack section
    pack_arch: str = ""  # the pack section's students; empty: arch
    pack_batch: int = 128  # each student's batch in the pack section (the study's student batch)
    pack_images: int = 256  # training images (x 162 views in each student's cache) of the pack section
    pack_steps: int = 1  # steps every student takes in a timed round of the pack section
    budget_s: float = 0.0  # the whole run's time budget (0: none); sections that no longer fit are skipped

    def distilled(self) -> tuple:
        return self.distill_sizes or self.ensemble_sizes

    def forwards(self) -> tuple:
        return tuple(m for m in (self.forward_sizes or self.ensemble_sizes) if m > 1)

    def packer(self) -> str:
        return self.pack_arch or self.arch


# The CPU runs packs one member after another (kd.sweep.pack's --stacked=auto), so a pack of k costs k steps:
# k <= 4 shows it at the study's batch; 8 and 16 are for accelerators, where packs stack.
CPU = Sizes(arch="preresnet20", teacher_batch=32, distill_batch=32, n_teacher=128, n_distill=32, epochs=4,
            bare_steps=12, paper_steps=4, rounds=3, gen_batch=64, gen_steps=(10, 25), pool_steps=25,
            cache_images=2, load_mib=64, pack_sizes=(1, 2, 4), pack_batch=128, pack_images=256, pack_steps=1)
# A GPU: the paper's sizes, every section cut to fit `python -m kd.bench --device=cuda` into 4 minutes on an
# H100/H200 (the compile section gets what is left of the budget; a mode that no longer fits is skipped).
CUDA = Sizes(arch="preresnet56", teacher_batch=256, distill_batch=128, n_teacher=2048, n_distill=1024, epochs=3,
             bare_steps=16, paper_steps=8, rounds=2, ensemble_sizes=(1, 3, 12), distill_sizes=(1, 3),
             forward_sizes=(3, 12), cache_images=48, cache_sizes=(3,), load_mib=512, gen_batch=256,
             gen_steps=(25, 100), gen_rounds=1, gen_big_batch=1024, unet="cifar10",
             compile_modes=("default", "reduce-overhead"), compile_epochs=3, compile_steps=8,
             pack_sizes=(1, 2, 4, 8, 16), pack_batch=128, pack_images=1024, pack_steps=6, budget_s=210.0)
SMOKE = Sizes(arch="preresnet8", teacher_batch=8, distill_batch=8, n_teacher=16, n_distill=8, epochs=2,
              bare_steps=2, paper_steps=2, rounds=1, ensemble_sizes=(1, 2), cache_images=2, cache_sizes=(2,),
              load_mib=1, gen_batch=2, gen_steps=(2,), gen_rounds=1, pool_steps=2, compile_epochs=2,
              pack_sizes=(1, 2), pack_batch=8, pack_images=16, pack_steps=2)
CLASSES = 100
TEMPERATURE = 4.0


class Clock:
    """The run's budget: seconds since the start, and whether ``need`` more seconds still fit."""

    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed() if self.budget else float("inf")

    def fits(self, need: float) -> bool:
        return self.left() >= need


def process_seconds() -> float | None:
    """Seconds since this process started (its imports included), from /proc; None where unknown."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------------------------------------
# the machine


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
           "device": str(device), "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()[0]}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def machine_line(m: dict) -> str:
    where = m.get("gpu") or f"CPU {m['cpu']}"
    load = f"load average {m['load_avg_start']:.1f} at start"
    if "load_avg_end" in m:
        load += f", {m['load_avg_end']:.1f} at end"
    return (f"{where} | {m['cores']} cores, {m['threads']} torch threads | torch {m['torch']} | "
            f"device {m['device']} | {load}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def timed(fn, device) -> tuple[object, float]:
    """(fn(), seconds), synchronised with the device before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def random_data(n: int, device: torch.device, seed: int):
    from kd.data import Data
    from kd.datasets import DATASETS

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    tx = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    ty = torch.randint(0, CLASSES, (32,), generator=g)
    return Data(DATASETS["cifar100"], x, y, tx, ty).to(device)


def subset(data, n: int):
    from kd.data import Data

    return Data(data.spec, data.train_x[:n], data.train_y[:n], data.test_x, data.test_y)


def teachers(m: int, arch: str, device: torch.device, seed: int = 100) -> list[torch.nn.Module]:
    """m random teachers; the first k of any call are the same k networks (ensembles share members)."""
    from kd.models import build_model

    torch.manual_seed(seed)
    return [build_model(arch, CLASSES).to(device).eval() for _ in range(m)]


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of the weights, as the teacher artifacts record it (the teacher cache keys on it)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def interleave(variants: dict, rounds: int) -> dict[str, list[float]]:
    """variant name -> callable returning images/s; every round runs each once, the order rotating."""
    names = list(variants)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(variants[name]())
    return out


def interleave_warm(variants: dict, rounds: int) -> dict[str, list[float]]:
    """:func:`interleave` after one untimed round of every variant (kernel choice, allocator, caches)."""
    return {k: v[1:] for k, v in interleave(variants, rounds + 1).items()}


def medians(samples: dict) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in samples.items()}


def ratio(samples: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))


@dataclass
class Bench:
    """One run's settings and what it has measured so far (every section appends its rows here)."""

    sizes: Sizes
    device: torch.device
    root: Path  # a temporary folder: run folders, cache files
    compile: bool
    clock: Clock
    rows: list
    printer: object = print
    skipped: list = field(default_factory=list)  # what did not fit the budget (or this device), by name

    def add(self, *new: dict) -> None:
        from kd.bench.table import fmt

        self.rows.extend(new)
        for r in new:
            self.printer(fmt(r), flush=True)
