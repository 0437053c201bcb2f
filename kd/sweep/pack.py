"""``python -m kd.sweep.pack SPEC.yaml [--pack N] [--stacked auto|True|False] [--dry_run]``: a grid of
``distill.py`` runs trained several to a process, as one stacked model.

On a GPU a small network at the paper's batch sizes is bound by kernel launches, not arithmetic; the runs of
a grid differ in seed, teachers and temperature, not in shape, so N of them train as one model whose every
convolution is one grouped convolution over the members (:mod:`kd.stacking`). Runs share a pack when they
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

``--stacked``: auto (default) stacks on accelerators and runs the members one after another on the CPU
(where vmap over convolutions is slower than a loop, as for :class:`kd.models.Ensemble`); the numbers are
the plain runs' either way, to float rounding when stacked, bitwise when not. One process only (no
``accelerate launch``), fp16 refused (bf16 or no).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

from kd import names, student
from kd.config import DistillConfig
from kd.errors import AlreadyDone, KDError, cli
from kd.flags import REQUIRED, pack_key, parse_flags, setting
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


def open_member(cfg, session, data, exits: contextlib.ExitStack):
    """A member as distill.py starts a run: seeded weights, W&B run, teachers, pool, cache, objective; resumed
    from its checkpoint if it has one."""
    from accelerate.utils import set_seed

    from kd.models import build_model, to_device
    from kd.optim import optimizer

    set_seed(cfg.run_seed, device_specific=False)  # the weights distill.py would draw
    model = to_device(build_model(cfg.arch, data.spec.num_classes), session.device, cfg.channels_last)
    session.check_outputs(student.room(cfg, data, model))
    exits.enter_context(session.tracked())
    objective, extra = student.prepare(cfg, session, data, model)
    return session.member(model, optimizer(model.parameters(), cfg), objective, compile=False), extra


def stepper(stacked: bool):
    """How the members of a pack step together (:mod:`kd.steppers`)."""
    from kd.engine import looped
    from kd.steppers import StackedStep

    if not stacked:
        return looped
    return lambda group: StackedStep([m.model for m in group], [m.optimizer for m in group])


def run_pack(cfgs: list[DistillConfig], stacked: str) -> None:
    from kd.session import Session

    sessions = [(cfg, session) for cfg in cfgs
                if not (session := Session(cfg, job=names.STUDENT)).already_finished() and claimed(session)]
    if not sessions:
        return
    acc = sessions[0][1].accelerator
    if acc.num_processes > 1:
        raise KDError("python -m kd.sweep.pack runs in one process: start it with python, not accelerate launch")
    if cfgs[0].mixed_precision == "fp16":
        raise KDError("packed runs do not scale fp16 losses: pass --mixed_precision=bf16 (or no) in the spec")
    from kd.data import load_dataset
    from kd.engine import fit

    data = load_dataset(cfgs[0].dataset, cfgs[0].data_dir, acc.device)
    stack = acc.device.type != "cpu" if stacked == "auto" else stacked == "True"
    print(f"pack of {len(sessions)} on {acc.device} ({'stacked' if stack else 'one after another'}): "
          + ", ".join(cfg.run_name() for cfg, _ in sessions), flush=True)
    with contextlib.ExitStack() as exits:
        opened = [open_member(cfg, session, data, exits) for cfg, session in sessions]
        fit([m for m, _ in opened], stepper(stack), desc=f"pack of {len(opened)}")
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
    stacked: str = setting("auto", "one stacked model (auto: on accelerators) or the members one after another",
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
