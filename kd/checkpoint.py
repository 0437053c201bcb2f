"""One checkpoint format for every trainer (teachers, students, generators): safetensors + a pointer JSON.

A checkpoint is one safetensors file of tensors (``model.*``, ``optim.<param>.<key>``, plus whatever extra
tensors a trainer keeps, e.g. an EMA) and a pointer JSON written *after* it that names the file, records its
sha256 and holds everything else (position, statistics, history, optimizer param groups). The pointer is the
commit: a kill between the two leaves the previous checkpoint in force. A pointer or file that does not
verify is refused (:class:`~kd.errors.KDError`), never silently replaced by a fresh start.

The pointer cannot be edited unseen: the tensors file records, in its safetensors metadata (inside the bytes
the pointer's sha256 covers), the sha256 of the pointer's own content (:func:`pointer_digest`); a pointer whose
content is not the one its tensors were saved with (an edited epoch, step, history or run id) is refused. The
pointer is read by the one metadata reader (:func:`kd.metadata.read_json`), with the types and ranges of its keys.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kd import faults
from kd.errors import KDError
from kd.io import load_tensors, remove_stale_temps, save_tensors, sha256_file, write_json
from kd.metadata import LARGE, Each, Shape, Within, read_json

RECORD = "kd_pointer_sha256"  # the safetensors metadata key of the pointer's digest
KEY_TYPES = {"file": str, "sha256": str, "fingerprint": str, "run_id": str, "history": Each(dict, list),
             "epoch": Within(int, 0, 10**6), "step": Within(int, 0, 10**12), "counter": Within(int, 0, 10**12),
             "param_groups": Each(dict, list), "identity": dict, "inputs": dict, "extra": dict, "sums": dict,
             "optim_scalars": dict}


def pointer_digest(info: dict) -> str:
    """The sha256 of a pointer's content (all but the tensors' own sha256), as JSON reads it back."""
    plain = json.loads(json.dumps({k: v for k, v in info.items() if k != "sha256"}, default=str))
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def recorded_digest(path: Path) -> str | None:
    """The pointer digest a tensors file records (None: a file saved without one)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get(RECORD)
    except (SafetensorError, OSError, ValueError) as e:
        raise KDError(f"{path} is not a readable safetensors file ({e})") from None


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as (tensors, JSON-able info); :func:`load_state_tensors` is the inverse."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": opt["param_groups"], "optim_scalars": scalars}


def load_state_tensors(tensors: dict, info: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, scalars in info.get("optim_scalars", {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


class Checkpoints:
    """The checkpoints of one folder: ``{stem}-K.safetensors`` named by ``pointer`` (newest only is kept)."""

    def __init__(self, folder: Path, pointer: str = "checkpoint.json", stem: str = "ckpt",
                 required: tuple = ("file", "sha256")):
        self.folder, self.pointer, self.stem, self.required = Path(folder), Path(folder) / pointer, stem, required
        self.shape = Shape(f"a checkpoint pointer ({', '.join(required)})",
                           {k: KEY_TYPES.get(k, object) for k in required},
                           {k: t for k, t in KEY_TYPES.items() if k not in required}, max_bytes=LARGE)
        self.info: dict | None = None

    def clean(self) -> None:
        """Temps of writes that were killed: never read, only space."""
        remove_stale_temps(self.folder)

    def clear(self) -> None:
        self.pointer.unlink(missing_ok=True)
        for p in self.folder.glob(f"{self.stem}-*.safetensors"):
            p.unlink()
        self.info = None

    def load(self, fix: str) -> dict | None:
        """The verified pointer (and its tensors' file checked by sha256), or None where there is none."""
        if not self.pointer.exists() and not self.pointer.is_symlink():
            return None
        try:
            info = read_json(self.pointer, self.shape)
        except KDError as e:
            why = str(e).split(": it should hold")[0]
            what = "incomplete" if " has no " in why else "corrupt"
            raise KDError(f"the checkpoint pointer {self.pointer} is {what} ({why}; expected keys "
                          f"{', '.join(self.required)}): {fix}") from None
        tensors = self.folder / info["file"]
        if tensors.parent != self.folder or not tensors.is_file():
            raise KDError(f"the checkpoint {tensors} named by {self.pointer.name} is missing: {fix}")
        if sha256_file(tensors) != info["sha256"]:
            raise KDError(f"the checkpoint {tensors} is corrupt (its sha256 does not match {self.pointer.name}): "
                          f"{fix}")
        record = recorded_digest(tensors)
        if record is not None and record != pointer_digest(info):
            raise KDError(f"the checkpoint pointer {self.pointer} was changed after its tensors were saved (its "
                          f"content is not the one {tensors.name} records: an edited epoch, step or history?): {fix}")
        self.info = info
        return info

    def tensors(self, device: str = "cpu") -> dict:
        return load_tensors(self.folder / self.info["file"], self.info["sha256"], device=device)

    def save(self, tensors: dict, info: dict, name: str | None = None) -> dict:
        """Write the tensors, then the pointer naming them; drop the previous file. Returns the pointer."""
        counter = (self.info or {}).get("counter", 0) + 1
        fname = name or f"{self.stem}-{counter}.safetensors"
        pointer = {**info, "file": fname, "counter": counter}
        digest = save_tensors(self.folder / fname, tensors, metadata={RECORD: pointer_digest(pointer)})
        faults.point("ckpt-write")  # the tensors are in place, the pointer still names the previous file
        self.info = {**pointer, "sha256": digest}
        write_json(self.pointer, self.info)
        for old in self.folder.glob(f"{self.stem}-*.safetensors"):
            if old.name != fname:
                old.unlink(missing_ok=True)
        return self.info
