"""Finding, verifying and loading teachers: which artifacts a student uses, checked before they are loaded."""

from __future__ import annotations

from kd import artifacts, names
from kd.data import Data
from kd.errors import KDError, first_line
from kd.io import load_weights
from kd.models import build_model
from kd.wandb_runs import wandb_mode

_SEED = names.TEACHER_SEED


def study_alias(cfg) -> str:
    """The artifact alias a run reads: its study's (pinned), or ``latest`` for runs outside a study."""
    return "latest" if cfg.study == "default" else cfg.study


def available_teachers(dataset: str, arch: str, store=None, run=None, alias: str = "latest") -> list[str]:
    """Teacher artifact names for (dataset, arch) holding ``alias``, sorted by seed: the local store, plus the
    run's own W&B entity and project when online."""
    prefix = names.teacher_prefix(dataset, arch)
    found = {n for n in artifacts.list_artifacts(prefix, store)
             if _SEED.search(n) and artifacts.local_versions(n, store, alias) is not None}
    if run is not None and wandb_mode() == "online":
        found |= _online_collections(run, prefix)
    return sorted(found, key=lambda n: int(_SEED.search(n).group(1)))


def _online_collections(run, prefix: str) -> set[str]:
    import wandb

    where = f"{run.entity}/{run.project}"
    try:
        colls = wandb.Api().artifact_collections(where, "model")
        return {c.name for c in colls if c.name.startswith(prefix) and _SEED.search(c.name)}
    except (wandb.errors.Error, ValueError, OSError) as e:
        why = first_line(e)
        raise KDError(f"cannot list the teachers of the W&B project {where} ({why}): check the project, your "
                      "access to it and the network, or name them with --teachers") from None


def select_block(available: list[str], m: int, trial: int) -> list[str]:
    """The authors' choice: a contiguous block of m teachers starting at (trial * m) mod N."""
    n = len(available)
    start = (trial * m) % n
    return [available[(start + i) % n] for i in range(m)]


def choose_teachers(cfg, run=None) -> list[str]:
    """The student's teachers: ``--teachers``, else the block (t*m) mod N of the study's pool.

    ``--teacher_pool=N`` declares the pool (seeds 0..N-1), so the block never depends on which teachers happen
    to be visible; with 0 the pool is every teacher of (dataset, arch) holding the study's alias.
    """
    if cfg.teacher_names():
        return cfg.teacher_names()
    arch = cfg.teacher_arch or cfg.arch
    if cfg.teacher_pool:
        if cfg.ensemble_size > cfg.teacher_pool:
            raise KDError(f"--ensemble_size={cfg.ensemble_size} exceeds --teacher_pool={cfg.teacher_pool}: "
                          "an ensemble takes distinct teachers of the pool")
        pool = [names.teacher_artifact(cfg.dataset, arch, s) for s in range(cfg.teacher_pool)]
        return select_block(pool, cfg.ensemble_size, cfg.trial)
    alias = study_alias(cfg)
    have = available_teachers(cfg.dataset, arch, cfg.store, run, alias)
    if cfg.ensemble_size > len(have):
        listing = ", ".join(have) if have else "none"
        which = "" if alias == "latest" else f" of study {alias}"
        raise KDError(
            f"--ensemble_size={cfg.ensemble_size} needs {cfg.ensemble_size} teachers{which} for {cfg.dataset}/{arch} "
            f"but {len(have)} exist ({listing}): train more with `python train.py --dataset={cfg.dataset} "
            f"--arch={arch} --study={cfg.study} --seed=K` (or the sweep sweeps/<dataset>/teachers.yaml)"
        )
    return select_block(have, cfg.ensemble_size, cfg.trial)


def check_online(teacher_names: list[str], alias: str, project: str) -> None:
    """Online, before the student's W&B run starts: each named teacher exists in the W&B project the run will
    log to ($WANDB_ENTITY/$WANDB_PROJECT as an agent sets them, else your entity and ``project``), so a missing
    one is refused with nothing written, neither a run folder nor a failed W&B run. (The run then fetches them
    through ``run.use_artifact``, which records the lineage.)"""
    import os

    import wandb

    try:
        api = wandb.Api()
        where = f"{os.environ.get('WANDB_ENTITY') or api.default_entity}/{os.environ.get('WANDB_PROJECT') or project}"
        missing = [n for n in teacher_names if not api.artifact_exists(f"{where}/{n}:{alias}", type="model")]
    except (wandb.errors.Error, ValueError, OSError) as e:
        why = first_line(e)
        raise KDError(f"cannot look up the teachers in W&B ({why}): check `wandb login` and the network, or run "
                      "offline with WANDB_MODE=offline") from None
    if missing:
        raise KDError(f"no teacher {missing[0]!r} with alias {alias!r} in the W&B project {where}: train it "
                      f"(python train.py ... --study=...), or upload an offline one with `wandb sync`")


def resolve_teachers(teacher_names: list[str], alias: str, run=None, store=None) -> list[str]:
    """Verified local folders of ``name:alias`` (online: downloaded through the run, recording lineage)."""
    hint = "; train it with train.py (with this --study) or pass other --teachers"
    return [str(artifacts.resolve(n, run=run, store=store, kind="teacher", hint=hint, alias=alias,
                                  needs=("meta.json",))) for n in teacher_names]


def load_teachers(teacher_names: list[str], folders: list[str], data: Data, device="cpu"):
    """Verified teacher modules (eval mode) and their metadata; refuses other datasets or class counts, and
    metadata that does not describe the weights beside it."""
    members, metas = [], []
    for name, folder in zip(teacher_names, folders):
        state, meta = load_weights(folder, device="cpu")
        if meta.get("dataset") != data.spec.name or meta.get("num_classes") != data.spec.num_classes:
            raise KDError(
                f"teacher {name} was trained on {meta.get('dataset')} with {meta.get('num_classes')} classes, "
                f"not {data.spec.name} with {data.spec.num_classes}: choose teachers of this dataset"
            )
        model = build_model(str(meta.get("arch")), meta["num_classes"])
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            why = first_line(e, 160)
            raise KDError(f"teacher {name}: its meta.json says arch {meta.get('arch')} with {meta['num_classes']} "
                          f"classes, but its weights do not fit that network ({why}); publish the teacher again "
                          "with train.py") from None
        members.append(model.to(device).eval())
        metas.append(meta)
    return members, metas
