"""One checkpoint format for every trainer (teachers, students, generators): safetensors + a pointer JSON.

A checkpoint is one safetensors file of tensors (``model.*``, ``optim.<param>.<key>``, plus whatever extra
tensors a trainer keeps, e.g. an EMA) and a pointer JSON written *after* it that names the file, records its
sha256 and holds everything else (position, statistics, history, optimizer param groups). The pointer is the
commit: a kill between the two leaves the previous checkpoint in force. A pointer or file that does not
verify is refused (:class:`~kd.errors.KDError`), never silently replaced by a fresh start.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kd import faults
from kd.errors import KDError
from kd.io import load_tensors, remove_stale_temps, save_tensors, sha256_file, write_json


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
        if not self.pointer.exists():
            return None
        try:
            info = json.loads(self.pointer.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise KDError(f"the checkpoint pointer {self.pointer} is corrupt ({type(e).__name__}): {fix}") from None
        if not isinstance(info, dict) or any(k not in info for k in self.required):
            raise KDError(f"the checkpoint pointer {self.pointer} is incomplete (expected keys "
                          f"{', '.join(self.required)}): {fix}")
        tensors = self.folder / str(info["file"])
        if tensors.parent != self.folder or not tensors.is_file():
            raise KDError(f"the checkpoint {tensors} named by {self.pointer.name} is missing: {fix}")
        if sha256_file(tensors) != info["sha256"]:
            raise KDError(f"the checkpoint {tensors} is corrupt (its sha256 does not match {self.pointer.name}): "
                          f"{fix}")
        self.info = info
        return info

    def tensors(self, device: str = "cpu") -> dict:
        return load_tensors(self.folder / self.info["file"], self.info["sha256"], device=device)

    def save(self, tensors: dict, info: dict, name: str | None = None) -> dict:
        """Write the tensors, then the pointer naming them; drop the previous file. Returns the pointer."""
        counter = (self.info or {}).get("counter", 0) + 1
        fname = name or f"{self.stem}-{counter}.safetensors"
        digest = save_tensors(self.folder / fname, tensors)
        faults.point("ckpt-write")  # the tensors are in place, the pointer still names the previous file
        self.info = {**info, "file": fname, "sha256": digest, "counter": counter}
        write_json(self.pointer, self.info)
        for old in self.folder.glob(f"{self.stem}-*.safetensors"):
            if old.name != fname:
                old.unlink(missing_ok=True)
        return self.info
