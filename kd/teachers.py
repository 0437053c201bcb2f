"""Finding, verifying and loading teachers: which artifacts a student uses, checked before they are loaded."""

from __future__ import annotations

from kd import artifacts, names
from kd.data import Data
from kd.errors import KDError
from kd.io import load_weights
from kd.models import build_model
from kd.wandb_runs import wandb_mode

_SEED = names.TEACHER_SEED


def available_teachers(dataset: str, arch: str, store=None, online_project: str | None = None) -> list[str]:
    """Teacher artifact names for (dataset, arch), sorted by seed: the local store, plus W&B when online."""
    prefix = names.teacher_prefix(dataset, arch)
    found = set(n for n in artifacts.list_artifacts(prefix, store) if _SEED.search(n))
    if online_project and wandb_mode() == "online":
        import wandb

        api = wandb.Api()
        for coll in api.artifact_collections(online_project, "model"):
            if coll.name.startswith(prefix) and _SEED.search(coll.name):
                found.add(coll.name)
    return sorted(found, key=lambda n: int(_SEED.search(n).group(1)))


def select_block(available: list[str], m: int, trial: int) -> list[str]:
    """The authors' choice: a contiguous block of m teachers starting at (trial * m) mod N."""
    n = len(available)
    start = (trial * m) % n
    return [available[(start + i) % n] for i in range(m)]


def choose_teachers(cfg, online_project: str | None = None) -> list[str]:
    if cfg.teacher_names():
        return cfg.teacher_names()
    arch = cfg.teacher_arch or cfg.arch
    have = available_teachers(cfg.dataset, arch, cfg.store, online_project)
    if cfg.ensemble_size > len(have):
        listing = ", ".join(have) if have else "none"
        raise KDError(
            f"--ensemble_size={cfg.ensemble_size} needs {cfg.ensemble_size} teachers for {cfg.dataset}/{arch} "
            f"but {len(have)} exist ({listing}): train more with `python train.py --dataset={cfg.dataset} "
            f"--arch={arch} --seed=K` (or the sweep sweeps/<dataset>/teachers.yaml)"
        )
    return select_block(have, cfg.ensemble_size, cfg.trial)


def load_teachers(teacher_names: list[str], data: Data, run=None, store=None, device="cpu"):
    """Verified teacher modules (eval mode) and their metadata; refuses other datasets or class counts, and
    metadata that does not describe the weights beside it."""
    members, metas = [], []
    for name in teacher_names:
        folder = artifacts.resolve(name, run=run, store=store, kind="teacher",
                                  hint="; train it with train.py or pass other --teachers")
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
            why = str(e).splitlines()[0][:160]
            raise KDError(f"teacher {name}: its meta.json says arch {meta.get('arch')} with {meta['num_classes']} "
                          f"classes, but its weights do not fit that network ({why}); publish the teacher again "
                          "with train.py") from None
        members.append(model.to(device).eval())
        metas.append(meta)
    return members, metas
