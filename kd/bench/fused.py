"""The fused pack (:mod:`kd.fused`) measured: a fused step of k members against k separate steps and against
the vmapped pack (:class:`kd.stacking.StackedModel`), in one process, and the ops a fused step runs.

    python -m kd.bench.fused                               # preresnet56, 32 px, 100 classes, batch 128, k = 1 2 4 8
    python -m kd.bench.fused --ks 1 2 --batch 32 --rounds 1
    python -m kd.bench.fused --device=cuda --bf16 --ks 1 2 4 8 16 [--compile]   # what a GPU gains

Every variant takes the students' step: each member its own batch and soft targets, the losses summed and
backpropagated once (separately for the separate runs), SGD with the study's hyperparameters; channels_last
unless ``--nchw``; bf16 autocast with ``--bf16``. Per k the variants run interleaved, one untimed step each
first, then ``--rounds`` rounds of ``--steps`` steps in rotating order; a figure is the median over rounds of a
step's seconds. A variant whose memory would not fit (its k=1 peak times k, against MemAvailable) is skipped
and named. Op counts (``torch.profiler`` on the CPU, batch 16): kernel ops (aten ops that do work themselves,
not views or allocations) and top-level aten ops in one training-mode forward and in one whole step.
``--pointwise`` also times a bottleneck's 1x1 convolutions as grouped convolutions and as batched matmuls.

On the CPU, glibc's malloc returns large freed blocks to the system and page-faults them in again on the
next allocation, which costs a fused step (k times larger activations) more than k separate ones; running
with ``MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=40000000000`` keeps them (a GPU's caching
allocator does so anyway).
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from kd.bench.common import sync
from kd.bench.packs import SGD
from kd.fused import FusedPreResNet, fuse_optimizer
from kd.models import build_model
from kd.stacking import StackedModel, stack_optimizer

VARIANTS = ("separate", "fused", "vmapped")
NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::view", "aten::as_strided", "aten::reshape",
             "aten::_reshape_alias", "aten::unsqueeze", "aten::squeeze", "aten::transpose", "aten::permute",
             "aten::expand", "aten::t", "aten::detach", "aten::alias", "aten::resize_", "aten::unflatten",
             "aten::select", "aten::slice", "aten::_unsafe_view", "aten::lift_fresh", "aten::empty_like",
             "aten::unbind", "aten::split", "aten::chunk", "aten::set_", "aten::_to_copy_meta", "aten::narrow"}


class Pack:
    """k members' models, optimizers and one variant's step."""

    def __init__(self, variant: str, k: int, args, device: torch.device):
        self.variant, self.device, self.bf16 = variant, device, args.bf16
        fmt = torch.contiguous_format if args.nchw else torch.channels_last
        self.models, self.opts = [], []
        for i in range(k):
            torch.manual_seed(1000 + i)
            model = build_model(args.arch, args.classes).to(device).to(memory_format=fmt).train()
            self.models.append(model)
            self.opts.append(torch.optim.SGD(model.parameters(), **SGD))
        compiled = (lambda m: torch.compile(m, dynamic=False)) if args.compile else (lambda m: m)
        self.forwards = [compiled(m) for m in self.models]
        if variant == "fused":
            self.fused = FusedPreResNet.from_members(self.models)
            self.opt = fuse_optimizer(self.fused, self.models, self.opts)
            self.forward = compiled(self.fused)
        elif variant == "vmapped":
            self.stacked = StackedModel(self.models)
            self.opt = stack_optimizer(self.stacked, self.opts)
        g = torch.Generator(device=device).manual_seed(5)
        shape = (args.batch, 3, args.hw, args.hw)
        self.xs = [torch.randn(shape, generator=g, device=device).contiguous(memory_format=fmt) for _ in range(k)]
        self.ts = [torch.randn(args.batch, args.classes, generator=g, device=device).softmax(-1) for _ in range(k)]

    def logits(self) -> list[torch.Tensor]:
        if self.variant == "fused":
            return list(self.forward(self.xs).unbind(0))
        if self.variant == "vmapped":
            return list(self.stacked(torch.stack(self.xs)).unbind(0))
        return [f(x) for f, x in zip(self.forwards, self.xs)]

    def step(self) -> None:
        amp = torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)
        if self.variant == "separate":  # one run after another: each its own graph, backward and step
            for forward, opt, x, t in zip(self.forwards, self.opts, self.xs, self.ts):
                with amp:
                    loss = F.cross_entropy(forward(x), t)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return
        with amp:
            loss = sum(F.cross_entropy(z, t) for z, t in zip(self.logits(), self.ts))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes(device: torch.device) -> int:
    """Free device memory; on the CPU MemAvailable plus what this process holds beyond its start (freed
    tensors that malloc kept: ``MALLOC_TRIM_THRESHOLD_`` below)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return free + max(_rss() - START_RSS, 0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


START_RSS = _rss()


def time_k(k: int, args, device: torch.device, memory: dict, skipped: list) -> dict[str, float]:
    """Median seconds per step of every variant that fits, the variants interleaved. ``memory["member"]``:
    the peak a member's step added, measured on the first separate step; a fused or vmapped step holds k
    members' graphs at once (the vmapped one some more)."""
    packs = {}
    for variant in VARIANTS:
        need = memory.get("member", 0) * (1 if variant == "separate" else k * (1.5 if variant == "vmapped" else 1.1))
        if need > 0.8 * available_bytes(device):
            skipped.append(f"{variant} k={k} (needs ~{need / 2**30:.1f} GiB)")
            continue
        before = peak_bytes(device)
        packs[variant] = Pack(variant, k, args, device)
        packs[variant].step()  # untimed: first-call costs
        sync(device)
        if variant == "separate" and "member" not in memory:
            memory["member"] = max(peak_bytes(device) - before, 1)
    times = {v: [] for v in packs}
    for r in range(args.rounds):
        order = list(packs)[r % len(packs):] + list(packs)[:r % len(packs)]
        for variant in order:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                packs[variant].step()
            sync(device)
            times[variant].append((time.perf_counter() - t0) / args.steps)
    del packs
    gc.collect()
    return {v: statistics.median(t) for v, t in times.items()}


def kernel_ops(fn) -> tuple[int, int]:
    """(kernel ops, top-level aten ops) that ``fn()`` runs, by torch.profiler on the CPU: a kernel op is an
    aten op that does work itself (not a view or an allocation) and calls no aten op that does."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    work: dict[int, bool] = {}

    def below(e) -> list:
        return [c for c in e.cpu_children if c.name.startswith("aten::")]

    def does_work(e) -> bool:  # e, or an aten op it calls, does work
        if id(e) not in work:
            work[id(e)] = e.name not in NO_KERNEL or any(does_work(c) for c in below(e))
        return work[id(e)]

    kernels = sum(e.name not in NO_KERNEL and not any(does_work(c) for c in below(e)) for e in events)
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return kernels, len(top)


def op_counts(k: int, args) -> dict[str, tuple[int, int]]:
    """Forward and whole-step op counts of one model and of the fused and vmapped packs of k, on the CPU, at
    batch 16 (the counts do not depend on the batch from 16 on; below it the CPU runs 1x1 convolutions by
    another path)."""
    cpu, out = torch.device("cpu"), {}
    small = argparse.Namespace(**{**vars(args), "batch": 16, "compile": False})
    for variant, kk in (("separate", 1), ("fused", k), ("vmapped", k)):
        pack = Pack(variant, kk, small, cpu)
        pack.step()
        name = "one model" if variant == "separate" else f"{variant} k={k}"
        out[f"{name} forward"] = kernel_ops(pack.logits)
        out[f"{name} step"] = kernel_ops(pack.step)
    return out


def pointwise(k: int, batch: int, rounds: int = 3) -> list[tuple[str, float, float]]:
    """A bottleneck's 1x1 convolutions (channels_last, forward + backward) as a ``groups=k`` convolution and as
    one ``bmm`` over the members: (shape, grouped ms, bmm ms)."""
    rows = []
    for cin, cout, hw in ((64, 16, 32), (16, 64, 32), (256, 64, 8), (64, 256, 8)):
        x = torch.randn(batch, k * cin, hw, hw).contiguous(memory_format=torch.channels_last).requires_grad_()
        wg = torch.randn(k * cout, cin, 1, 1).contiguous(memory_format=torch.channels_last).requires_grad_()
        wb = torch.randn(k, cin, cout, requires_grad=True)
        runs = {"grouped": lambda x=x, wg=wg: F.conv2d(x, wg, groups=k).sum().backward(),
                "bmm": lambda x=x, wb=wb, cin=cin, shape=(batch, hw, hw, k * cout): _bmm(x, wb, k, cin, shape)}
        times = {name: [] for name in runs}
        for _ in range(rounds + 1):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
        rows.append((f"{cin}->{cout} @{hw}px", *(statistics.median(t[1:]) * 1e3 for t in times.values())))
    return rows


def _bmm(x: torch.Tensor, w: torch.Tensor, k: int, cin: int, shape: tuple) -> None:
    a = x.permute(0, 2, 3, 1).reshape(-1, k, cin).transpose(0, 1)  # [k, N*H*W, Cin], a view of channels_last
    torch.bmm(a, w).transpose(0, 1).reshape(shape).permute(0, 3, 1, 2).sum().backward()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m kd.bench.fused", description=__doc__.split("\n")[0])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--arch", default="preresnet56")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--hw", type=int, default=32)
    p.add_argument("--steps", type=int, default=1, help="steps a variant per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: torch's default)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile the fused and separate forwards")
    p.add_argument("--pointwise", action="store_true", help="also time 1x1 convolutions: grouped vs bmm")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.arch}, {args.hw} px, {args.classes} classes, batch {args.batch} a member, "
          f"{'NCHW' if args.nchw else 'channels_last'}, {'bf16 autocast' if args.bf16 else 'float32'}, "
          f"{device.type} ({torch.get_num_threads()} threads), {args.rounds} rounds of {args.steps} step(s)"
          + (", compiled" if args.compile else ""))
    memory, skipped = {}, []
    print(f"{'k':>3} | " + " | ".join(f"{v:>12}" for v in VARIANTS) + " | fused vs separate | fused vs vmapped")
    for k in args.ks:
        t = time_k(k, args, device, memory, skipped)
        cells = " | ".join(f"{t[v]:10.2f} s" if v in t else f"{'skipped':>12}" for v in VARIANTS)
        vs = [f"{t[b] / t['fused']:15.2f}x" if b in t and "fused" in t else f"{'':>16}"
              for b in ("separate", "vmapped")]
        print(f"{k:>3} | {cells} | {vs[0]} | {vs[1]}", flush=True)
    print("(seconds per step of all k members; 'x' = how many times faster the fused step is)")
    for name, (kernels, top) in op_counts(max(args.ks), args).items():
        print(f"ops {name:>26}: {kernels:5d} kernel ops, {top:5d} top-level aten ops")
    if args.pointwise:
        for k in (1, max(args.ks)):
            for shape, grouped, bmm in pointwise(k, min(args.batch, 64)):
                print(f"1x1 conv k={k} {shape:>16}: grouped {grouped:7.1f} ms, bmm {bmm:7.1f} ms (fwd + bwd)")
    if skipped:
        print("skipped: " + ", ".join(skipped))


if __name__ == "__main__":
    main()
