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
import re
import shutil
import tempfile
from pathlib import Path

from kd import faults
from kd.errors import KDError, check_name, first_line
from kd.io import (
    MANIFEST,
    POINTER,
    WEIGHTS_META,
    owner_tag,
    plain_file_name,
    read_json,
    remove_stale_temps,
    sha256_file,
    umask,
    write_json,
)
from kd.wandb_runs import wandb_mode

VERSION_RE = re.compile(r"v(?:0|[1-9][0-9]{0,8})")  # fullmatch: v0, v1, ... (no path, no sign, no padding)


def store_root(store: str | Path | None = None) -> Path:
    return Path(store or os.environ.get("KD_STORE") or "artifacts").resolve()


def _artifact_dir(name: str, store) -> Path:
    check_name(name, "artifact name")
    root = store_root(store)
    folder = (root / name).resolve()
    if root not in folder.parents:
        raise KDError(f"artifact name {name!r} would leave the store {root}")
    if folder != root / name:  # a link to another artifact of the store
        raise KDError(f"artifact folder {root / name} is a link to {folder}: an artifact is a folder of its own; "
                      "remove the link and publish the artifact again")
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
    same = _same_as_newest(folder, versions, type, files, metadata, run_id)
    if same is not None:  # a publish cut off after its version folder appeared: that version, not a copy of it
        version = same
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".incoming-{owner_tag()}-", dir=folder))
        try:
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700: the version folder keeps the umask
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
    for alias in aliases[1:]:  # e.g. the study: `name:{study}` stays on this version whatever is published later
        write_json(_alias_file(folder, alias), {"version": version})
    write_json(folder / "latest.json", {"version": version})
    if run is not None:
        import wandb

        art = wandb.Artifact(name, type=type, metadata=metadata)
        for f in files:
            art.add_file(str(f))
        run.log_artifact(art, aliases=aliases)
    return folder / version


def _same_as_newest(folder: Path, versions: list[int], type: str, files, metadata: dict,
                    run_id: str | None = None) -> str | None:
    """The newest version if this run (``run_id``) published it with exactly these files, type and metadata (so a
    rerun adds no copy); another run's identical output is a version of its own (each run's lineage)."""
    if not versions:
        return None
    newest = folder / f"v{max(versions)}"
    try:
        manifest = verify_folder(newest)
    except KDError:  # damaged (or half-deleted): never reused; the new version is written beside it
        return None
    hashes = {Path(f).name: sha256_file(f) for f in files}
    plain = json.loads(json.dumps(metadata, sort_keys=True, default=str))  # as write_json stored it
    if manifest.get("type") == type and manifest.get("files") == hashes and manifest.get("metadata") == plain \
            and manifest.get("run_id") == run_id:
        return newest.name
    return None


def _alias_file(folder: Path, alias: str) -> Path:
    return folder / f"alias-{check_name(alias, 'artifact alias')}.json"


def local_versions(name: str, store=None, alias: str = "latest") -> Path | None:
    """The version folder ``name:alias`` points at in the local store, None if there is none."""
    folder = _artifact_dir(name, store)
    pointer = folder / "latest.json" if alias == "latest" else _alias_file(folder, alias)
    if not pointer.exists() and not pointer.is_symlink():
        return None
    version = read_json(pointer, POINTER)["version"]
    if not VERSION_RE.fullmatch(version):
        raise KDError(f"{pointer} points at {version!r}, which is not a version of {name} (v<number> inside "
                      f"{folder}): publish the artifact again, or delete the file")
    return folder / version


def aliases_of(name: str, store=None) -> list[str]:
    """The aliases other than ``latest`` that the local store holds for ``name``."""
    folder = _artifact_dir(name, store)
    return sorted(p.stem[len("alias-"):] for p in folder.glob("alias-*.json"))


def list_artifacts(prefix: str = "", store=None) -> list[str]:
    root = store_root(store)
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith(prefix) and (p / "latest.json").exists())


def verify_folder(folder: Path, needs: tuple[str, ...] = ()) -> dict:
    """The manifest of a version folder, everything in it checked: the folder is a real folder (no link) of its
    artifact, the manifest describes this artifact and version, lists every file the folder holds and every
    file in ``needs`` (the files the caller reads), and each file is a plain file with the recorded sha256."""
    folder = Path(folder)
    fix = f"delete {folder} and publish it again"
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise KDError(f"artifact version {folder} is a link or a file, not a version folder of "
                      f"{folder.parent.name}: {fix}")
    if not (folder / "manifest.json").exists():
        raise KDError(f"missing file {folder / 'manifest.json'}: version {folder.name} of {folder.parent.name} is "
                      f"not (wholly) in the store; publish the artifact again")
    manifest = read_json(folder / "manifest.json", MANIFEST)
    if (manifest["name"], manifest["version"]) != (folder.parent.name, folder.name):
        raise KDError(f"{folder / 'manifest.json'} describes {manifest['name']}:{manifest['version']}, not "
                      f"{folder.parent.name}:{folder.name} (copied from another artifact?): {fix}")
    files = manifest["files"]
    for fname, digest in files.items():
        plain_file_name(fname, folder / "manifest.json")
        path = folder / fname
        if fname == "manifest.json" or not isinstance(digest, str) or path.is_symlink():
            raise KDError(f"artifact file {path} is not a plain file its manifest can vouch for: {fix}")
        if not path.exists():
            raise KDError(f"artifact file {path} is missing: {fix}")
        if not path.is_file() or sha256_file(path) != digest:
            raise KDError(f"artifact file {path} is corrupt (sha256 mismatch): {fix}")
    unlisted = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json" and p.name not in files)
    if unlisted:
        raise KDError(f"artifact version {folder} holds {', '.join(unlisted)}, which its manifest does not list: "
                      f"{fix}")
    unread = [n for n in needs if n not in files]
    if unread:
        raise KDError(f"the manifest of {folder} does not list {', '.join(unread)}, which is read from it: {fix}")
    return manifest


def weights_listed(folder: Path, manifest: dict) -> None:
    """``meta.json``'s ``file`` (the weights a loader reads) is one of the files the manifest vouches for."""
    meta = read_json(folder / "meta.json", WEIGHTS_META)
    weights = meta.get("file", "model.safetensors")
    if weights not in manifest["files"]:
        raise KDError(f"{folder / 'meta.json'} names the weights {weights!r}, which its manifest does not list: "
                      f"delete {folder} and publish it again")


def resolve(name: str, run=None, store=None, kind: str = "artifact", hint: str = "", alias: str = "latest",
            needs: tuple[str, ...] = ()) -> Path:
    """A verified local folder holding artifact ``name:alias`` (online: downloaded through the run, so W&B
    records the lineage; any W&B failure is one KDError naming the fix). ``needs``: the files the caller reads,
    which the manifest must list (with ``meta.json``, the weights it names too)."""
    if run is not None and wandb_mode() == "online":
        return _download(name, alias, run, store, kind)
    folder = local_versions(name, store, alias)
    if folder is None:
        which = "" if alias == "latest" else f" with alias {alias!r}"
        raise KDError(f"no {kind} {name!r}{which} in the local store {store_root(store)} "
                      f"({_holdings(name, store)}){hint}")
    manifest = verify_folder(folder, needs)
    if "meta.json" in needs:
        weights_listed(folder, manifest)
    return folder


def _holdings(name: str, store) -> str:
    """What the store does hold for ``name`` (or its family): for error messages."""
    if local_versions(name, store) is not None:
        others = aliases_of(name, store)
        return f"{name} exists, with aliases latest{''.join(', ' + a for a in others)}"
    prefix = name.split("-")[0] + "-" if "-" in name else ""
    have = list_artifacts(prefix, store)
    return f"have: {', '.join(have) if have else 'none'}"


def _download(name: str, alias: str, run, store, kind: str) -> Path:
    import wandb

    where = f"{run.entity}/{run.project}"
    try:
        art = run.use_artifact(f"{name}:{alias}")
        return Path(art.download(root=str(_artifact_dir(name, store) / f"wandb-{art.version}")))
    except (wandb.errors.Error, ValueError, OSError) as e:
        why = first_line(e)
        local = local_versions(name, store, alias)
        if local is not None:
            raise KDError(f"{kind} {name}:{alias} is not in the W&B project {where} ({why}) but is in the local "
                          f"store ({local}): upload its offline run with `wandb sync wandb/offline-run-*` into "
                          f"{where}, or use the local copy with WANDB_MODE=offline") from None
        raise KDError(f"cannot fetch {kind} {name}:{alias} from the W&B project {where} ({why}): check the name, "
                      "your access to the project and the network (`wandb login`)") from None
