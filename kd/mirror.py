"""Checkpoints that outlive their machine: a run folder's newest checkpoint mirrored as an artifact.

A preempted run that W&B requeues may restart on another machine, whose run folder is empty. So a teacher's or
student's checkpoint is also published as the artifact ``checkpoint-{run folder name}`` (at a stop, at the last
epoch, and otherwise at most every 5 minutes: :meth:`kd.session.Session.save_checkpoint`)
(type ``checkpoint``: the tensors file and its pointer JSON): into the local store, which keeps only the
newest version (a store shared between machines, e.g. ``KD_STORE`` on a network file system, is enough
offline), and, online, into the run's W&B project, where the ``latest`` alias moves to it. A run whose folder
holds no checkpoint first looks for that artifact (online in W&B, else in the store), copies its files into the
folder (the tensors first, the pointer last: the pointer commits) and resumes from it, in the same W&B run
(the pointer records its id, which the folder's ``run.json`` then records too). A folder whose checkpoint is of
the same W&B run but at an earlier position than the store's mirror (the run went on on another machine) takes
the mirror's too (:func:`newer`). Which machine trains the run is its claim beside the mirror (:mod:`kd.claims`).

A mirrored checkpoint that does not verify is refused in one line: delete its version folder (the run then
resumes from its own checkpoint, or starts over), or pass ``--resume=False``; a ``latest.json`` left naming a
deleted version is a mirror that is not there (one note line).

Once a run finished (:meth:`kd.session.Session.finish`), :func:`prune_online` deletes every older version of its
mirror from W&B, so a finished run keeps one checkpoint there, as in the store.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from kd import artifacts, faults
from kd.errors import KDError, first_line
from kd.io import MANIFEST, atomic_write, read_json
from kd.metadata import Shape

TYPE = "checkpoint"


def artifact_name(run_dir: Path) -> str:
    return f"checkpoint-{Path(run_dir).name}"


def publish(run_dir: Path, tensors: Path, pointer: Path, info: dict, run=None, store=None) -> Path:
    """The checkpoint ``tensors`` + ``pointer`` as the newest (and, in the store, only) version of its artifact."""
    name = artifact_name(run_dir)
    meta = {k: info[k] for k in ("epoch", "step", "run_id", "fingerprint") if k in info}
    faults.point("mirror-publish")
    where = artifacts.publish(name, TYPE, [tensors, pointer], meta, run=run, store=store)
    for old in where.parent.glob("v*"):
        if old.is_dir() and old != where:
            shutil.rmtree(old, ignore_errors=True)
    for alias in where.parent.glob("alias-*.json"):
        alias.unlink(missing_ok=True)  # the run id's alias: it would point at a removed version
    return where


def _position(info: dict) -> tuple:
    return info.get("epoch") or 0, info.get("step") or 0


def newer(run_dir: Path, pointer: Path, shape: Shape, store=None) -> bool:
    """Whether the folder should take the mirrored checkpoint: it has none, or the store's mirror is of the same
    W&B run at a later position (epoch, step)."""
    pointer = Path(pointer)
    if not pointer.exists() and not pointer.is_symlink():
        return True
    try:
        version = artifacts.local_versions(artifact_name(run_dir), store)
        if version is None or not (version / "manifest.json").is_file():
            return False
        mirrored = read_json(version / "manifest.json", MANIFEST).get("metadata") or {}
        local = read_json(pointer, shape)
    except KDError:
        return False  # the folder's own checkpoint is in force (and is refused when opened, if damaged)
    return mirrored.get("run_id") == local["run_id"] and _position(mirrored) > _position(local)


def fetched_run_id(pointer: Path, shape: Shape) -> str:
    return read_json(pointer, shape)["run_id"]


def _local(name: str, store) -> tuple[Path | None, list[str]]:
    """The store's mirrored version of ``name`` and its files (verified); None where there is none, or where
    ``latest.json`` names a version that was deleted (one note line)."""
    source = artifacts.local_versions(name, store)
    if source is None:
        return None, []
    if not source.exists() and not source.is_symlink():
        print(f"note: the mirrored checkpoint {name} names {source.name}, which is not in the store (deleted): "
              "starting without it", file=sys.stderr, flush=True)
        return None, []
    try:
        return source, list(artifacts.verify_folder(source)["files"])
    except KDError as e:
        why = str(e).split(": delete ")[0].split(": version ")[0]
        raise KDError(f"the mirrored checkpoint {source} does not verify ({why}): delete {source} (this run then "
                      "resumes from its own checkpoint, or starts over), or pass --resume=False") from None


def fetch(run_dir: Path, pointer: Path, mode: str, project: str, store=None) -> Path | None:
    """Copy the mirrored checkpoint of ``run_dir`` into the folder of its ``pointer`` file (when there is one);
    returns where it came from."""
    pointer_name = Path(pointer).name
    name = artifact_name(run_dir)
    if mode == "online":
        source = _download(name, project, store)
        listed = [] if source is None else [p.name for p in source.iterdir() if p.is_file()]
    else:
        source, listed = _local(name, store)
    if source is None:
        return None
    files = sorted(listed, key=lambda f: f == pointer_name)  # the pointer last (its tensors' sha256 is checked
    # when the checkpoint is loaded)
    if pointer_name not in files:
        raise KDError(f"the mirrored checkpoint {source} holds no {pointer_name}: delete it, or pass --resume=False")
    into = Path(pointer).parent
    into.mkdir(parents=True, exist_ok=True)
    try:
        for fname in files:
            with atomic_write(into / fname) as out, open(source / fname, "rb") as src:
                shutil.copyfileobj(src, out)
    except FileNotFoundError:  # the run's holder mirrored a newer checkpoint meanwhile (the old one is removed)
        raise KDError(f"the mirrored checkpoint {source} changed while it was copied: run the same command again "
                      "to take the newer one") from None
    return source


def _download(name: str, project: str, store) -> Path | None:
    """The newest version of ``name`` in W&B (the run's entity, ``project``), downloaded; None if there is none."""
    import os

    import wandb

    try:
        api = wandb.Api()
        entity = os.environ.get("WANDB_ENTITY") or api.default_entity
        art = api.artifact(f"{entity}/{os.environ.get('WANDB_PROJECT') or project}/{name}:latest", type=TYPE)
        root = artifacts.store_root(store) / name / f"wandb-{art.version}"
        return Path(art.download(root=str(root)))
    except wandb.errors.CommError as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            return None
        raise KDError(f"W&B did not answer whether this run has a mirrored checkpoint ({name}: "
                      f"{first_line(e)}): check the network and `wandb login`, or run offline with "
                      "WANDB_MODE=offline") from None
    except (ValueError, OSError) as e:
        raise KDError(f"cannot download this run's mirrored checkpoint {name} from W&B ({type(e).__name__}: "
                      f"{first_line(e)}): check the network and the free space of "
                      "the store, or run offline with WANDB_MODE=offline") from None


def prune_online(run_dir: Path, project: str) -> int:
    """Online, after the run finished: every version of its mirrored checkpoint in W&B but the newest (``latest``)
    is deleted (its files and aliases), so W&B holds one checkpoint per finished run; returns how many. A failure is
    a warning (the run did finish; the versions can be deleted in the W&B UI), never the run's failure."""
    import os

    import wandb

    name = artifact_name(run_dir)
    try:
        api = wandb.Api()
        entity = os.environ.get("WANDB_ENTITY") or api.default_entity
        where = f"{entity}/{os.environ.get('WANDB_PROJECT') or project}/{name}"
        old = [a for a in api.artifacts(TYPE, where) if "latest" not in a.aliases]
        for art in old:
            art.delete(delete_aliases=True)
        return len(old)
    except (wandb.errors.Error, ValueError, OSError) as e:
        print(f"warning: the older versions of the checkpoint artifact {name} were not deleted from W&B "
              f"({first_line(e)}): delete them in the W&B UI if they take room", file=sys.stderr, flush=True)
        return 0
