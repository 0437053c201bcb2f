"""The local artifact store: a mirror of every artifact the repository logs to W&B.

* The local store (``--store``, ``$KD_STORE`` or ``./artifacts``) holds ``NAME/vK/`` folders with a
  ``manifest.json`` (files and their sha256, metadata, aliases, the producing run) and ``NAME/latest.json``
  pointing at the newest version. A version folder appears by one rename, so a reader never sees half of it.
* :func:`publish` logs a W&B artifact (online: uploaded; offline: staged in the run for ``wandb sync``) and
  mirrors it. :func:`resolve` returns a verified local folder: online through ``run.use_artifact(...)
  .download()`` so W&B records lineage, offline from the mirror.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from kd import faults
from kd.errors import KDError, check_name
from kd.io import owner_tag, read_json, remove_stale_temps, sha256_file, write_json
from kd.wandb_runs import wandb_mode


def store_root(store: str | Path | None = None) -> Path:
    return Path(store or os.environ.get("KD_STORE") or "artifacts").resolve()


def _artifact_dir(name: str, store) -> Path:
    check_name(name, "artifact name")
    root = store_root(store)
    folder = (root / name).resolve()
    if root not in folder.parents:
        raise KDError(f"artifact name {name!r} would leave the store {root}")
    return folder


def publish(name: str, type: str, files: list[str | Path], metadata: dict, run=None,
            aliases: list[str] | None = None, store=None) -> Path:
    """Mirror ``files`` as the next version of ``name`` in the local store and log them to W&B.

    The same files, type and metadata as the newest (intact) version are that version again, not a copy: a
    publish killed between its version folder and ``latest.json`` is finished by running it again.
    """
    folder = _artifact_dir(name, store)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)  # staging folders of publishes that were killed
    versions = [int(p.name[1:]) for p in folder.glob("v*") if p.name[1:].isdigit()]
    version = f"v{max(versions, default=-1) + 1}"
    aliases = ["latest", *(aliases or [])]
    run_id = getattr(run, "id", None)
    if run_id:
        aliases.append(run_id)
    same = _same_as_newest(folder, versions, type, files, metadata)
    if same is not None:  # a publish cut off after its version folder appeared: that version, not a copy of it
        version = same
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".incoming-{owner_tag()}-", dir=folder))
        try:
            hashes = {}
            for f in map(Path, files):
                shutil.copy2(f, tmp / f.name)
                hashes[f.name] = sha256_file(tmp / f.name)
            manifest = {"name": name, "type": type, "version": version, "files": hashes,
                        "metadata": metadata, "aliases": aliases, "run_id": run_id}
            write_json(tmp / "manifest.json", manifest)
            os.replace(tmp, folder / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    faults.point("publish-version")  # the version folder is in place, latest.json not yet written
    write_json(folder / "latest.json", {"version": version})
    if run is not None:
        import wandb

        art = wandb.Artifact(name, type=type, metadata=metadata)
        for f in files:
            art.add_file(str(f))
        run.log_artifact(art, aliases=aliases)
    return folder / version


def _same_as_newest(folder: Path, versions: list[int], type: str, files, metadata: dict) -> str | None:
    """The newest version if it holds exactly these files, type and metadata (so a rerun adds no copy)."""
    if not versions:
        return None
    newest = folder / f"v{max(versions)}"
    try:
        manifest = verify_folder(newest)
    except KDError:  # damaged (or half-deleted): never reused; the new version is written beside it
        return None
    hashes = {Path(f).name: sha256_file(f) for f in files}
    plain = json.loads(json.dumps(metadata, sort_keys=True, default=str))  # as write_json stored it
    if manifest.get("type") == type and manifest.get("files") == hashes and manifest.get("metadata") == plain:
        return newest.name
    return None


def local_versions(name: str, store=None) -> Path | None:
    folder = _artifact_dir(name, store)
    if not (folder / "latest.json").exists():
        return None
    return folder / read_json(folder / "latest.json")["version"]


def list_artifacts(prefix: str = "", store=None) -> list[str]:
    root = store_root(store)
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith(prefix) and (p / "latest.json").exists())


def verify_folder(folder: Path) -> dict:
    manifest = read_json(folder / "manifest.json")
    for fname, digest in manifest["files"].items():
        path = folder / fname
        if not path.exists():
            raise KDError(f"artifact file {path} is missing: delete {folder} and publish it again")
        if sha256_file(path) != digest:
            raise KDError(f"artifact file {path} is corrupt (sha256 mismatch): delete {folder} and publish it again")
    return manifest


def resolve(name: str, run=None, store=None, kind: str = "artifact", hint: str = "") -> Path:
    """A verified local folder holding artifact ``name:latest`` (online: downloaded with lineage)."""
    if run is not None and wandb_mode() == "online":
        art = run.use_artifact(f"{name}:latest")
        path = Path(art.download(root=str(_artifact_dir(name, store) / f"wandb-{art.version}")))
        return path
    folder = local_versions(name, store)
    if folder is None:
        prefix = name.rsplit("-", 1)[0] + "-" if "-" in name else ""
        have = list_artifacts(prefix.split("-")[0] + "-", store)
        listing = ", ".join(have) if have else "none"
        raise KDError(f"no {kind} {name!r} in the local store {store_root(store)} (have: {listing}){hint}")
    verify_folder(folder)
    return folder
