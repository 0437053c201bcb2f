"""``python -m kd.sweep.pack SPEC.yaml [--pack N] [--stacked auto|True|False] [--dry_run]``: a grid of
``distill.py`` runs trained several to a process, as one fused network.

On a GPU a small network at the paper's batch sizes is bound by kernel launches, not arithmetic; the runs of
a grid differ in seed, teachers and temperature, not in shape, so N of them train as one network whose every
convolution is one grouped convolution over the members (:class:`kd.fused.FusedPreResNet`, stepped by
:class:`kd.steppers.FusedStep`). Runs share a pack when they
agree in everything that sets the shape of a step and its learning rate (:func:`kd.flags.pack_keys`: each field of
:class:`~kd.config.DistillConfig` declares whether pack members may differ in it); each pack holds
at most ``--pack`` runs.

Each member stays its own ``distill.py`` run, through the functions ``distill.py`` calls (:mod:`kd.student`: teachers,
pool, cache, objective, artifact, summary), its own :class:`~kd.session.Session` and the engine's one loop
(:func:`kd.engine.fit`, which steps the members together through a :mod:`kd.steppers` stepper): the run folder
``distill.py`` would use for its config (so ``python distill.py`` with it afterwards says "already finished", and
``python -m kd.sweep`` on the same spec finishes at once), a checkpoint every epoch in the engine's format (a plain
``distill.py`` run of that config resumes it), its own W&B run (config, history per epoch, final summary; several open
in one process), its own student artifact. Killed, the same command resumes every member from its checkpoint; SIGTERM
/ SIGINT checkpoint every member at the next step (exit 143 / 130). The outputs go under the current folder, as
``python distill.py`` run from there would write them: run it from the repository root, where ``python -m kd.sweep``
runs its programs.

``--stacked``: auto (default) fuses preresnet runs on accelerators and runs the members one after another on
the CPU (where the loop is the faster, as for :class:`kd.models.Ensemble`) and for architectures that do not
fuse (timm); True fuses (an architecture that cannot is refused with one line); the numbers are the plain
runs' either way, to float rounding when fused, bitwise when not. A pack whose steps would take more than half
of the device's free memory is refused with one line naming the ``--pack`` that fits (:func:`check_pack_fits`).
The members' teachers are read once per process: each teacher's cache file is loaded (or built) once, and the
members that distill from the same teacher set share one cache (:class:`kd.teacher_cache.ResidentTeachers`).
One process only (no ``accelerate launch``), fp16 refused (bf16 or no).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch

from kd import names, student
from kd.config import DistillConfig
from kd.errors import AlreadyDone, KDError, cli
from kd.flags import REQUIRED, pack_key, parse_flags, setting
from kd.fused import can_fuse, check_fusable
from kd.sweep.spec import load_spec


def grid_configs(spec) -> list[DistillConfig]:
    """Every run of a distill.py grid, parsed from the very flags ``wandb agent`` would pass."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    if spec.flags_cls is not DistillConfig:
        raise KDError(f"{spec.path}: python -m kd.sweep.pack packs distill.py runs; {spec.program} runs one per "
                      f"process: python -m kd.sweep {spec.path}")
    if spec.grid is None:
        raise KDError(f"{spec.path}: method {spec.method} has no fixed list of runs to pack: use method grid "
                      "(or python -m kd.sweep / wandb agent)")
    return [parse_flags(DistillConfig, create_sweep_command_args({"args": c})["args"]) for c in spec.grid]


def plan(configs: list[DistillConfig], size: int) -> list[list[DistillConfig]]:
    """The packs: each run once (the first config of each run folder), grouped by :func:`pack_key` in grid
    order, each group cut into packs of ``size``."""
    groups: dict[tuple, list] = {}
    seen: set = set()
    for cfg in configs:  # the same run folder is the same run (a real-only config names any pool)
        if cfg.run_dir() in seen:
            continue
        seen.add(cfg.run_dir())
        groups.setdefault(pack_key(cfg), []).append(cfg)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def claimed(session) -> bool:
    """The member's run folder locked for this process; a run another process is training (or finished
    meanwhile) is skipped with one line, never trained twice."""
    try:
        if session.folder.claim(wait=False):
            return True
        print(f"skipped: another process is training {session.run_dir}", flush=True)
    except AlreadyDone as e:
        print(e, flush=True)
    return False


def open_member(cfg, session, data, exits: contextlib.ExitStack, resident=None):
    """A member as distill.py starts a run: seeded weights, W&B run, teachers, pool, cache, objective; resumed
    from its checkpoint if it has one."""
    from accelerate.utils import set_seed

    from kd.models import build_model, to_device
    from kd.optim import optimizer

    set_seed(cfg.run_seed, device_specific=False)  # the weights distill.py would draw
    model = to_device(build_model(cfg.arch, data.spec.num_classes), session.device, cfg.channels_last)
    session.check_outputs(student.room(cfg, data, model))
    exits.enter_context(session.tracked())
    objective, extra = student.prepare(cfg, session, data, model, resident)
    return session.member(model, optimizer(model.parameters(), cfg), objective, compile=False), extra


def stepper(fused: bool):
    """How the members of a pack step together (:mod:`kd.steppers`)."""
    from kd.engine import looped
    from kd.steppers import FusedStep

    if not fused:
        return looped
    return lambda group: FusedStep([m.model for m in group], [m.optimizer for m in group])


WEIGHT_COPIES = 5  # weights, gradients, momentum, and the fused network's weights and momentum beside the members'


def member_step_bytes(cfg: DistillConfig, spec) -> int:
    """About what one member's training step holds (a fused network's step holds k times as much): the tensors
    autograd saves for the backward pass, counted on a meta-device forward of its batch in float32 (nothing
    allocated), and its weights :data:`WEIGHT_COPIES` times."""
    from kd.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.arch, spec.num_classes)
    saved: dict[int, torch.Tensor] = {}  # by identity: a tensor saved by two operations is held once

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.train()(torch.empty(cfg.batch_size, 3, spec.image_size, spec.image_size, device="meta"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in saved.values()) + WEIGHT_COPIES * weights


def check_pack_fits(cfgs: list[DistillConfig], spec, device: torch.device, share: float = 0.5) -> None:
    """Refuse a pack whose training steps would take more than ``share`` of the device's free memory, naming the
    largest --pack that fits."""
    from kd.teacher_cache import free_bytes

    free = free_bytes(device)
    each = member_step_bytes(cfgs[0], spec)
    if free is None or len(cfgs) * each <= share * free:
        return
    fits = int(share * free // each)
    fix = f"pass --pack={fits}" if fits else "lower --batch_size (one member alone does not fit)"
    raise KDError(f"a pack of {len(cfgs)} {cfgs[0].arch} runs at batch {cfgs[0].batch_size} needs about "
                  f"{len(cfgs) * each / 2**30:.1f} GiB for its steps but {device} has {free / 2**30:.1f} GiB free: "
                  f"{fix}")


def fuses(stacked: str, arch: str, device: torch.device) -> bool:
    """Whether the pack trains fused: --stacked=True (refused for an architecture that does not fuse), or auto on
    an accelerator for an architecture that fuses."""
    if stacked == "True":
        check_fusable(arch)
        return True
    return stacked == "auto" and device.type != "cpu" and can_fuse(arch)


def run_pack(cfgs: list[DistillConfig], stacked: str) -> None:
    from kd.session import Session

    if stacked == "True":
        check_fusable(cfgs[0].arch)  # before anything is opened
    sessions = [(cfg, session) for cfg in cfgs if not (session := Session(cfg, job=names.STUDENT)).already_finished()]
    if not sessions:
        return
    acc = sessions[0][1].accelerator
    if acc.num_processes > 1:
        raise KDError("python -m kd.sweep.pack runs in one process: start it with python, not accelerate launch")
    if cfgs[0].mixed_precision == "fp16":
        raise KDError("packed runs do not scale fp16 losses: pass --mixed_precision=bf16 (or no) in the spec")
    from kd.data import load_dataset
    from kd.datasets import dataset_spec
    from kd.engine import fit

    fused = fuses(stacked, cfgs[0].arch, acc.device)
    check_pack_fits([cfg for cfg, _ in sessions], dataset_spec(cfgs[0].dataset), acc.device)  # before any claim
    sessions = [(cfg, session) for cfg, session in sessions if claimed(session)]
    if not sessions:
        return
    data = load_dataset(cfgs[0].dataset, cfgs[0].data_dir, acc.device)
    from kd.teacher_cache import ResidentTeachers

    fused = fuses(stacked, cfgs[0].arch, acc.device)
    check_pack_fits([cfg for cfg, _ in sessions], dataset_spec(cfgs[0].dataset), acc.device)
    data = load_dataset(cfgs[0].dataset, cfgs[0].data_dir, acc.device)
    print(f"pack of {len(sessions)} on {acc.device} ({'fused' if fused else 'one after another'}): "
          + ", ".join(cfg.run_name() for cfg, _ in sessions), flush=True)
    resident = ResidentTeachers()  # each teacher's file read once; one cache per teacher set
    with contextlib.ExitStack() as exits:
        opened = [open_member(cfg, session, data, exits, resident) for cfg, session in sessions]
        resident.release_files()
        fit([m for m, _ in opened], stepper(fused), desc=f"pack of {len(opened)}")
        for m, extra in opened:
            model = m.session.accelerator.unwrap_model(m.model)
            final, path = student.publish(m.cfg, m.session, model, m.objective, m.history, extra)
            student.report(m.cfg, m.session, m.objective, final, path)


@dataclass
class PackSettings:
    """python -m kd.sweep.pack SPEC: a grid of distill.py runs trained several to a process."""

    spec: str = setting(REQUIRED, "a W&B grid spec of distill.py runs, e.g. sweeps/demo/ensemble_size.yaml (its dry "
                                  "run lists the packs)", positional=True)
    pack: int = setting(4, "runs per pack (one process trains one pack at a time)", lo=1, hi=1024)
    stacked: str = setting("auto", "one fused network (auto: on accelerators, for preresnet runs) or the members "
                                   "one after another",
                           choices=("auto", "True", "False"))
    dry_run: bool = setting(False, "print the packs; run nothing", choices=(True, False))


def main(argv: list[str] | None = None) -> int:
    with cli():
        args = parse_flags(PackSettings, argv)
        spec = load_spec(args.spec)
        configs = grid_configs(spec)
        packs = plan(configs, args.pack)
        if args.dry_run:
            for i, cfgs in enumerate(packs):
                print(f"pack {i + 1}/{len(packs)}: " + " ".join(cfg.run_name() for cfg in cfgs))
            same = len(configs) - sum(map(len, packs))
            also = f" ({same} configs of the grid are the same run as another: trained once)" if same else ""
            print(f"dry run: {sum(map(len, packs))} runs of {spec.program} in {len(packs)} packs{also}; nothing was "
                  "run", file=sys.stderr)
            return 0
        for key in ("entity", "project"):  # as python -m kd.sweep exports them to its runs
            if spec.config.get(key):
                os.environ[f"WANDB_{key.upper()}"] = str(spec.config[key])
        os.environ.pop("WANDB_RUN_ID", None)  # one id for one run: every member has its own
        for i, cfgs in enumerate(packs):
            print(f"[pack {i + 1}/{len(packs)}]", flush=True)
            run_pack(cfgs, args.stacked)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
