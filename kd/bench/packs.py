"""The pack section: k students trained as one pack (:mod:`kd.steppers`, what ``python -m kd.sweep.pack`` runs)
against the same k students trained plainly, one after another, for every k of ``Sizes.pack_sizes``.

Every student distils from its own teacher-output table through :class:`kd.objectives.Distill` with
``cache=``, the step the study's students take (the teacher cache path: per (image, view) targets gathered,
then the loss), at the student batch of ``Sizes.pack_batch``, its own seed, temperature (1 and 4, as the
ensemble-size sweep) and SGD (the study's lr, momentum, Nesterov, weight decay). The tables hold random
log-probabilities (their values do not change what a step costs), so the section needs no teachers built.

* **plain**: k students, each its own forward/backward/SGD step as ``distill.py`` takes it (channels_last,
  bf16 autocast on a GPU), one student's steps after another's: what k plain runs on one device cost.
* **pack**: the same k students as one pack, a step of all members at once as :func:`kd.engine.train_segment`
  takes it (one backward of the summed losses, one optimizer step): stacked (one vmapped model,
  :class:`kd.steppers.StackedStep`) on accelerators, one member after another on the CPU
  (:class:`kd.steppers.LoopedStep`): ``python -m kd.sweep.pack``'s ``--stacked=auto`` rule.

Per k the two run interleaved (one untimed round first), ``pack_steps`` steps a student a round; a rate is
images/s in all (k x batch x steps / seconds), per member (in all / k), and student-steps/s (in all / batch).
A k that no longer fits the run's budget is skipped, with every larger k, and named. The section runs eager:
a compiled stacked pack (:class:`CompiledStackedPack`) is timed by the compile section at the best k, in its
child process under the budget; on the CPU packs loop, so compiling one is compiling the student step,
which the compile section times (``--compile``).
"""

from __future__ import annotations

import time

import torch

from kd.bench.common import CLASSES, Bench, amp, interleave_warm, medians, random_data, ratio, sync, teachers
from kd.bench.table import note, row

TEMPERATURES = (1.0, 4.0)  # the ensemble-size sweep's
SGD = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}  # the study's students (sweeps/cifar100)


def stacks(device: torch.device) -> bool:
    """``python -m kd.sweep.pack --stacked=auto``: one stacked model on accelerators, a loop on the CPU."""
    return device.type != "cpu"


class CompiledStackedPack:
    """A :class:`kd.steppers.StackedStep` whose forward (the members' vmapped model) is one static-shape
    ``torch.compile`` graph; everything else (optimizer step, ``close``) is the pack's own."""

    def __init__(self, models: list, optimizers: list, mode: str | None = None):
        from kd.steppers import StackedStep

        self.pack = StackedStep(models, optimizers)
        self.forward = torch.compile(self.pack.stacked.__call__, dynamic=False, mode=mode)

    def __call__(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.forward(torch.stack(xs)).unbind(0))

    def __getattr__(self, name):  # step, train, set_lr, close: the pack's
        return getattr(self.__dict__["pack"], name)


class Students:
    """The k_max students of a section: their data, cache tables and objectives (student i is the same
    configuration whether it trains plainly or in a pack; each variant builds its own weights)."""

    def __init__(self, k_max: int, arch: str, batch: int, n_images: int, device: torch.device):
        from types import SimpleNamespace

        from kd.config import DistillConfig
        from kd.models import Ensemble
        from kd.objectives import Distill

        self.arch, self.batch, self.device = arch, batch, device
        data = random_data(n_images, device, seed=5)
        g = torch.Generator(device=device).manual_seed(5)
        ens = Ensemble(teachers(1, arch, device))  # only for Distill's test-set targets, computed once
        self.objectives = []
        for i in range(k_max):
            table = torch.randn(n_images, data.num_views, CLASSES, generator=g, device=device).log_softmax(-1)
            cfg = DistillConfig(batch_size=batch, temperature=TEMPERATURES[i % 2], seed=i)
            acc = SimpleNamespace(autocast=lambda: amp(device), process_index=0, num_processes=1)
            self.objectives.append(Distill(cfg, data, ens, cache=table, acc=acc))

    def build(self, k: int) -> tuple[list, list, list]:
        """k fresh students: (models, optimizers, batch streams), as distill.py prepares them."""
        from kd.models import build_model

        models, opts, streams = [], [], []
        for i in range(k):
            torch.manual_seed(1000 + i)
            model = build_model(self.arch, CLASSES).to(self.device).to(memory_format=torch.channels_last).train()
            models.append(model)
            opts.append(torch.optim.SGD(model.parameters(), **SGD))
            streams.append(forever(self.objectives[i]))
        return models, opts, streams


def forever(objective):
    """An objective's batches, epoch after epoch."""
    epoch = 0
    while True:
        yield from objective.batches(epoch)
        epoch += 1


class Plain:
    """k students trained one after another, each step the engine's: channels_last, autocast, loss, SGD."""

    def __init__(self, students: Students, k: int):
        self.models, self.opts, self.streams = students.build(k)
        self.objectives, self.device, self.batch = students.objectives[:k], students.device, students.batch

    def round(self, steps: int) -> float:
        """Images/s in all."""
        sync(self.device)
        t0 = time.perf_counter()
        for model, opt, stream, objective in zip(self.models, self.opts, self.streams, self.objectives):
            for _ in range(steps):
                batch = next(stream)
                with amp(self.device):
                    loss, _ = objective.loss(model(batch["x"].contiguous(memory_format=torch.channels_last)), batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        sync(self.device)
        return len(self.models) * steps * self.batch / (time.perf_counter() - t0)


class Pack:
    """The same k students as one pack, each step :func:`kd.engine.train_segment`'s: every member's
    batch, one forward of the pack, the losses summed and backpropagated once, one optimizer step."""

    def __init__(self, students: Students, k: int, stacked: bool, compiled: bool = False):
        from kd.steppers import LoopedStep, StackedStep

        models, opts, self.streams = students.build(k)
        if compiled:
            self.pack = CompiledStackedPack(models, opts)
        elif stacked:
            self.pack = StackedStep(models, opts)
        else:
            self.pack = LoopedStep(models, opts, channels_last=True)
        self.pack.train()
        self.objectives, self.device, self.batch, self.k = students.objectives[:k], students.device, students.batch, k

    def round(self, steps: int) -> float:
        """Images/s in all."""
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            batches = [next(s) for s in self.streams]
            with amp(self.device):
                logits = self.pack([b["x"] for b in batches])
                loss = sum(o.loss(z, b)[0] for o, z, b in zip(self.objectives, logits, batches))
            loss.backward()
            self.pack.step()
        sync(self.device)
        return self.k * steps * self.batch / (time.perf_counter() - t0)


def rates(img_s_all: float, k: int, batch: int) -> dict:
    """A pack's (or k plain students') images/s and student-steps/s, in all and per member."""
    return {"img_s_all": img_s_all, "img_s_member": img_s_all / k, "student_steps_s_all": img_s_all / batch,
            "student_steps_s_member": img_s_all / batch / k}


def best_k(result: dict) -> int | None:
    """The measured k that makes the study's students cheapest (:func:`kd.bench.projection.best_pack`), else
    the one whose pack trains the most images/s in all (None: none measured); ``result["k"]`` is keyed by
    str(k), as in the JSON."""
    from kd.bench.projection import best_pack

    ks = result.get("k", {})
    if not ks:
        return None
    return best_pack({k: v["gain"] for k, v in ks.items()}) or int(max(ks, key=lambda k: ks[k]["pack"]["img_s_all"]))


def compare(students: Students, k: int, stacked: bool, steps: int, rounds: int) -> dict[str, list[float]]:
    """Images/s in all of a pack of k and of the same k students plain, interleaved after a warm-up round."""
    pack, plain = Pack(students, k, stacked), Plain(students, k)
    return interleave_warm({"pack": lambda: pack.round(steps), "plain": lambda: plain.round(steps)}, rounds)


def bench_packs(b: Bench) -> dict:
    sizes, device = b.sizes, b.device
    stacked = stacks(device)
    how = "stacked" if stacked else "looped"
    students = Students(max(sizes.pack_sizes), sizes.packer(), sizes.pack_batch, sizes.pack_images, device)
    out: dict = {"arch": sizes.packer(), "batch": sizes.pack_batch, "images": sizes.pack_images,
                 "steps_per_round": sizes.pack_steps, "rounds": sizes.rounds, "stacked": stacked, "how": how,
                 "k": {}, "skipped": [],
                 "compiled": "timed by the compile section at the best k" if stacked else
                             "not run: the CPU loops packs, so a compiled pack is the compiled student step "
                             "(the compile section, with --compile)"}
    last = None  # (k, seconds) of the last k measured: the next one's cost is about proportional to k
    for k in sizes.pack_sizes:
        need = last[1] * k / last[0] * 1.2 + 2 if last else 0.0
        if not b.clock.fits(need):
            out["skipped"] = [f"pack k={j}" for j in sizes.pack_sizes if j >= k]
            b.skipped.extend(out["skipped"])
            b.add(note(f"pack k>={k}: skipped", "over budget", f"{b.clock.elapsed():.0f} s used", "",
                       f"needs ~{need:.0f} s"))
            break
        t0 = time.perf_counter()
        s = compare(students, k, stacked, sizes.pack_steps, sizes.rounds)
        last = (k, time.perf_counter() - t0)
        med = medians(s)
        gain = ratio(s, "pack", "plain")
        out["k"][str(k)] = {"samples_img_s": s, "pack": rates(med["pack"], k, sizes.pack_batch),
                            "plain": rates(med["plain"], k, sizes.pack_batch), "gain": gain, "seconds": last[1]}
        b.add(row(f"pack k={k} ({how}) vs {k} plain student{'s' if k > 1 else ''}", med["pack"], med["plain"],
                  gain, None),
              note(f"pack k={k}: img/s a member; steps/s in all", f"{med['pack'] / k:.0f} img/s",
                   f"{med['plain'] / k:.0f} img/s", f"{med['pack'] / sizes.pack_batch:.2f} st/s",
                   f"plain {med['plain'] / sizes.pack_batch:.2f} st/s"))
    out["best_k"] = best_k(out)
    if not stacked:
        b.add(note("pack compiled: not run (packs loop here)", "skipped", "", "", "= compiled student"))
    return out
