"""Publishing a generator or a pool once: a rerun that made the same files (and metadata) adds no version."""

from __future__ import annotations

import sys
from pathlib import Path

from kd.artifacts import held, publish, store_root
from kd.io import check_folder
from kd.wandb_runs import wandb_dir, wandb_mode


def check_outputs(out: Path, flag: str, store) -> None:
    """The output folder, the artifact store and the W&B folder are writable folders, checked before any work or
    W&B run."""
    check_folder(out, flag)
    check_folder(store_root(store), "the artifact store (--store or $KD_STORE)")
    if wandb_mode() != "disabled":
        check_folder(wandb_dir() or ".", "the W&B folder ($WANDB_DIR, else the current folder)")


def publish_once(name: str, type: str, files: list[Path], metadata: dict, tracker, store, hint: str = "") -> Path:
    """Publish ``files`` as artifact ``name`` (to the local store, and through ``tracker``'s W&B run), unless,
    offline, the store's newest version already holds them; one line on stderr says which."""
    same = held(name, type, files, metadata, store)
    if same is not None and tracker.mode != "online":
        print(f"artifact {name}: the store already holds these files ({same})", file=sys.stderr)
        return same
    where = publish(name, type, files, metadata, run=tracker.run, store=store)
    print(f"artifact {name} ({where.name}) in {where.parent}{hint}", file=sys.stderr)
    return where
