"""``python -m kd.sweep.prereqs SPEC``: does every run of a sweep spec find what it needs? (``make sweep`` runs it
before ``wandb sweep``, so a sweep whose runs would all fail is never created.)

For each config of the grid (the flags ``wandb agent`` passes, parsed by the program's own parser) the inputs a
run resolves before it trains: its teachers (``--teachers``, or the block its trial takes of the study's pool:
:func:`kd.teachers.choose_teachers`, under the study's alias), its synthetic pool (which must also hold the
trial's block: :func:`kd.draws.pool_images_needed`, where the pool's metadata is at hand) and its generator
(``NAME@stepN``: the artifact NAME). Where they are looked up is where the runs will look: with a W&B login the
W&B project the sweep's runs log to (``wandb.Api().artifact_exists``; ``--entity``/``--project``, else
$WANDB_ENTITY/$WANDB_PROJECT, else your entity and the spec's project), else the local artifact store.
The datasets need nothing here: torchvision downloads CIFAR on a run's first use.

Every missing input is one line naming it, the runs that need it and the command that makes it; exit 2 when any
is missing (nothing is created), 0 with one summary line otherwise.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kd import artifacts, names
from kd.errors import KDError, cli, first_line
from kd.flags import REQUIRED, check_fields, parse_flags, setting
from kd.sweep.spec import load_spec


@dataclass
class Need:
    name: str  # artifact name
    alias: str
    type: str  # W&B artifact type: model | dataset
    make: str  # the command that makes it
    images: int = 0  # a pool: the images the largest trial's block needs
    runs: list = field(default_factory=list)  # run names that need it


def _make_teacher(spec_path: Path, online: bool) -> str:
    teachers = spec_path.parent / "teachers.yaml"
    if online:
        return f"wandb sweep {teachers} and its agents (make agents SWEEP=...)"
    return f"python -m kd.sweep {teachers}"


def _make_generator(name: str, dataset: str) -> str:
    if m := re.fullmatch(rf"generator-{re.escape(dataset)}-gnosis-e(\d+)(-bilinear)?", name):
        extra = " --upsample=bilinear" if m[2] else ""
        return f"python -m kd.synthetic import --source=gnosis --dataset={dataset} --epoch={m[1]}{extra}"
    if name.endswith("-sngan") or "-sngan-" in name:
        return f"python -m kd.synthetic train --generator=sngan --dataset={dataset}"
    return f"python -m kd.synthetic train --dataset={dataset}"


def needs_of(spec_path: Path, online: bool) -> list[Need]:
    """Every input the spec's runs resolve, each once, with the runs that need it."""
    from kd.draws import pool_images_needed
    from kd.sweep.plan import runs_of
    from kd.teachers import choose_teachers, study_alias

    spec = load_spec(spec_path)
    found: dict[str, Need] = {}

    def add(need: Need, run: str) -> None:
        have = found.setdefault(need.name, need)
        have.images = max(have.images, need.images)
        have.runs.append(run)

    for cfg in runs_of(spec).values():
        if spec.program != "distill.py":
            continue
        run = cfg.run_name()
        if not online and not cfg.teacher_names() and not cfg.teacher_pool:
            try:
                teachers = choose_teachers(cfg)
            except KDError as e:  # too few teachers in the store: the count is the missing input
                add(Need(f"{cfg.ensemble_size} teachers of study {cfg.study}", "", "model",
                         _make_teacher(spec_path, online) + f" ({first_line(e)})"), run)
                continue
        else:
            teachers = choose_teachers(cfg) if (cfg.teacher_names() or cfg.teacher_pool) else []
        for t in teachers:
            add(Need(t, study_alias(cfg), "model", _make_teacher(spec_path, online)), run)
        if not cfg.synthetic_ratio:
            continue
        n = round(cfg.synthetic_ratio * _n_train(cfg.dataset))
        if cfg.synthetic_pool:
            need = pool_images_needed(n, cfg.trial)
            add(Need(cfg.synthetic_pool, "latest", "dataset", f"python -m kd.synthetic generate --dataset={cfg.dataset}"
                     " --num={images} --model=... (the pool's generator; see the spec's comments)", need), run)
        elif cfg.synthetic_generator:
            base = cfg.synthetic_generator.partition(names.STEP_MARK)[0]
            add(Need(base, "latest", "model", _make_generator(base, cfg.dataset)), run)
    return list(found.values())


def _n_train(dataset: str) -> int:
    from kd.datasets import dataset_spec

    return dataset_spec(dataset).n_train


def _local_problem(need: Need, store) -> str | None:
    if " teachers of " in need.name:  # the store holds fewer of the study's teachers than the ensemble takes
        return "missing"
    from kd.pools import is_artifact_name

    if need.type == "dataset" and not is_artifact_name(need.name):  # a pool file or folder
        path = Path(need.name).expanduser()
        folder = path if path.is_dir() else path.parent if path.is_file() else None
    else:
        folder = artifacts.local_versions(need.name, store, need.alias)
    if folder is None:
        return "missing"
    meta = folder / "pool.json"
    if need.images and meta.is_file():
        from kd.io import POOL, read_json

        count = read_json(meta, POOL).get("count")
        if isinstance(count, int) and count < need.images:
            return f"holds {count} images, the trials' blocks need {need.images}"
    return None


def _online_problems(needs: list[Need], where: str) -> dict[str, str]:
    import wandb

    try:
        api = wandb.Api()
        return {n.name: "missing" for n in needs
                if " teachers of " in n.name or not api.artifact_exists(f"{where}/{n.name}:{n.alias}", type=n.type)}
    except (wandb.errors.Error, ValueError, OSError) as e:
        raise KDError(f"cannot look up the sweep's inputs in the W&B project {where} ({first_line(e)}): check "
                      "`wandb login` and the network, or check offline with WANDB_MODE=offline") from None


def check(spec_path: Path, online: bool, where: str = "", store=None) -> list[str]:
    """One line per missing input (empty: every run finds what it needs)."""
    needs = needs_of(spec_path, online)
    if online:
        problems = _online_problems(needs, where)
    else:
        problems = {n.name: p for n in needs if (p := _local_problem(n, store)) is not None}
    lines = []
    for need in needs:
        if need.name in problems:
            place = f"the W&B project {where}" if online else f"the local store {artifacts.store_root(store)}"
            alias = f":{need.alias}" if need.alias and need.alias != "latest" else ""
            runs = need.runs[0] + (f" and {len(need.runs) - 1} more runs" if len(need.runs) > 1 else "")
            make = need.make.replace("{images}", str(need.images))
            lines.append(f"{need.name}{alias} ({problems[need.name]} in {place}; needed by {runs}): {make}")
    return lines


def _where(spec_path: Path, entity: str, project: str) -> str:
    import wandb

    config = load_spec(spec_path).config
    project = project or os.environ.get("WANDB_PROJECT") or config.get("project") or names.PROJECT
    entity = entity or os.environ.get("WANDB_ENTITY") or config.get("entity") or wandb.Api().default_entity
    if not entity:
        raise KDError("no W&B entity for the sweep: pass --entity=NAME (your user or team)")
    return f"{entity}/{project}"


@dataclass
class PrereqSettings:
    """python -m kd.sweep.prereqs SPEC: does every run of a sweep spec find its teachers, pools and generators?"""

    spec: str = setting(REQUIRED, "a W&B grid spec of distill.py runs, e.g. sweeps/cifar100/self_distill.yaml",
                        positional=True)
    entity: str = setting("", "with a W&B login: the entity the sweep's runs log to; empty: $WANDB_ENTITY, else yours")
    project: str = setting("", "with a W&B login: the project; empty: $WANDB_PROJECT, else the spec's project")
    store: str = setting("", "without a login: the local artifact store; empty: $KD_STORE, else ./artifacts")

    def validate(self) -> None:
        check_fields(self)


def main(argv: list[str] | None = None) -> int:
    from kd.wandb_runs import wandb_mode

    with cli():
        args = parse_flags(PrereqSettings, argv)
        spec_path = Path(args.spec)
        online = wandb_mode() == "online"
        where = _where(spec_path, args.entity, args.project) if online else ""
        missing = check(spec_path, online, where, args.store or None)
        if missing:
            for line in missing:
                print(f"error: missing {line}", file=sys.stderr)
            print(f"error: {spec_path}: {len(missing)} input(s) missing: make them first (commands above); no sweep "
                  "was created", file=sys.stderr)
            return 2
        print(f"{spec_path}: every run finds its inputs ({'W&B ' + where if online else 'local store'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
