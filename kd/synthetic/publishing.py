"""Publishing a generator or a pool once: a rerun that made the same files (and metadata) adds no version."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kd.artifacts import local_versions, publish
from kd.io import read_json


def already_published(name: str, file: str, digest: str, metadata: dict, store) -> Path | None:
    """The store's latest version of ``name`` when it already holds ``file`` with this sha256 and metadata."""
    folder = local_versions(name, store)
    if folder is None:
        return None
    manifest = read_json(folder / "manifest.json")
    plain = json.loads(json.dumps(metadata, sort_keys=True, default=str))  # as the manifest stored it
    same = manifest["files"].get(file) == digest and manifest.get("metadata") == plain
    return folder if same else None


def publish_once(name: str, type: str, files: list[Path], metadata: dict, digest: str, run, store, mode: str,
                 hint: str = "") -> Path:
    """Publish ``files`` as artifact ``name`` (``files[0]`` is the one ``digest`` is of), unless offline the
    store's latest version already holds them; one line on stderr says which."""
    same = already_published(name, files[0].name, digest, metadata, store)
    if same is not None and mode != "online":
        print(f"artifact {name}: the store already holds these files ({same})", file=sys.stderr)
        return same
    where = publish(name, type, files, metadata, run=run if mode != "disabled" else None, store=store)
    print(f"artifact {name} ({where.name}) in {where.parent}{hint}", file=sys.stderr)
    return where
