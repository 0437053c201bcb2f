"""Timing with device synchronisation, the run's budget, and the JSON written after every section.

:class:`Timer` times ``steps`` calls of a step as one span: on CUDA between two CUDA events recorded on the
stream (the span ends when the GPU has finished the last step), elsewhere with ``perf_counter`` after the
device is synchronised on both sides. Warm-up calls (compilation, CUDA-graph capture, the allocator, cudnn's
kernel choice) run before and are not timed; spans repeat until ``min_s`` seconds are timed, and a rate is
the median span's.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, device.type):
        getattr(torch, device.type).synchronize()


class Timer:
    """Seconds per call of a step, synchronised with ``device``."""

    def __init__(self, device: torch.device, min_s: float, warmup: int = 3, span: int = 5, min_spans: int = 3):
        self.device, self.min_s, self.warmup, self.span, self.min_spans = device, min_s, warmup, span, min_spans

    def span_seconds(self, step, steps: int) -> float:
        """Seconds ``steps`` calls of ``step`` take on the device."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(self.device)
        return time.perf_counter() - t0

    def per_step(self, step, warmup: int | None = None) -> dict:
        """{"s": median seconds a call, "steps": calls timed, "spans": per-call seconds of every span}."""
        for _ in range(self.warmup if warmup is None else max(warmup, self.warmup)):
            step()
        spans, timed = [], 0.0
        while timed < self.min_s or len(spans) < self.min_spans:
            s = self.span_seconds(step, self.span)
            spans.append(s / self.span)
            timed += s
        return {"s": statistics.median(spans), "steps": len(spans) * self.span, "spans": spans}


class Clock:
    """The run's budget: seconds since the start, and whether ``need`` more seconds still fit (0: no budget)."""

    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed() if self.budget else float("inf")

    def fits(self, need: float) -> bool:
        return self.left() >= need


class Record:
    """The run's JSON: every section's measurements and the reasons of what was skipped, written (atomically,
    through :func:`kd.io.write_json`) whenever :meth:`save` is called: after every section."""

    def __init__(self, path: str | Path, head: dict):
        self.path, self.data = Path(path), {**head, "sections": {}, "skipped": {}, "order": []}

    def section(self, name: str, result: dict) -> None:
        self.data["sections"][name] = result
        self.data["order"].append(name)
        self.save()

    def skip(self, name: str, reason: str) -> None:
        self.data["skipped"][name] = reason
        self.save()

    def save(self) -> None:
        from kd.io import write_json

        write_json(self.path, self.data)


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
           "device": str(device), "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()[0]}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out
