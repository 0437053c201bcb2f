"""The folder of one run, whatever trains in it (teacher, student, packed student, DDPM, SN-GAN).

It holds, and this module alone decides:

* the configuration's identity (what the numbers depend on) and its ``fingerprint``;
* the resume rules (``--resume``): ``auto`` continues a checkpoint of the same identity, ``True`` requires one,
  ``False`` clears the folder's checkpoints, run id and done marker first; a checkpoint of another identity is
  refused, naming the settings that differ;
* the checkpoints, in the one format of :mod:`kd.checkpoint`;
* ``run.json``: the W&B run id, recorded before W&B first sees it, so a run killed before its first checkpoint
  continues the same W&B run;
* ``done.json``: the marker of a finished run (written after its W&B run ended).

Only the main process writes here; every process reads the checkpoint it resumes from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kd.checkpoint import Checkpoints
from kd.config import fingerprint
from kd.errors import KDError
from kd.io import read_json, write_json
from kd.wandb_runs import new_run_id

RUN_ID_FILE = "run.json"
DONE_FILE = "done.json"
CKPT_KEYS = ("file", "sha256", "fingerprint", "run_id", "history")


def recorded_run_id(folder: Path, main: bool = True) -> str:
    """The W&B run id recorded in ``folder/run.json``, else $WANDB_RUN_ID (as an agent sets it) or a new one,
    recorded there (by the main process) before W&B sees it."""
    file = Path(folder) / RUN_ID_FILE
    if file.exists():
        return read_json(file)["run_id"]
    run_id = os.environ.get("WANDB_RUN_ID") or new_run_id()
    if main:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json(file, {"run_id": run_id})
    return run_id


class RunFolder:
    """``path`` with its checkpoints in ``path/{ckpt_dir}`` (pointer ``pointer``, files ``{stem}-*.safetensors``)."""

    def __init__(self, path: str | Path, identity: dict, resume: str = "auto", *, ckpt_dir: str = "",
                 pointer: str = "checkpoint.json", stem: str = "ckpt", required: tuple = (), main: bool = True):
        self.path = Path(path)
        self.identity = json.loads(json.dumps(identity, default=str))  # tuples -> lists, as read back from JSON
        self.fingerprint = fingerprint(identity)
        self.resume, self.main = str(resume), main
        self.checkpoints = Checkpoints(self.path / ckpt_dir if ckpt_dir else self.path, pointer=pointer, stem=stem,
                                       required=CKPT_KEYS + tuple(required))
        self.ckpt: dict | None = None
        self.inputs: dict = {}

    # ----------------------------------------------------------------------------------------- resume
    @property
    def finished(self) -> bool:
        return (self.path / DONE_FILE).exists()

    def done_info(self) -> dict:
        return read_json(self.path / DONE_FILE)

    def open(self) -> dict | None:
        """Apply the resume rules; returns the checkpoint to continue from (verified), or None."""
        if self.main:
            self.checkpoints.clean()  # temps of writes that were killed: never read, only space
        if self.resume == "False":
            if self.main:
                self.checkpoints.clear()
                for name in (DONE_FILE, RUN_ID_FILE):
                    (self.path / name).unlink(missing_ok=True)
            return None
        if self.finished and self.resume == "auto":
            return None  # the caller reports the finished run; its last checkpoint is not needed
        fix = f"pass --resume=False to train this run from scratch (or restore the file); run folder {self.path}"
        ckpt = self.checkpoints.load(fix)
        if ckpt is not None and ckpt["fingerprint"] != self.fingerprint:
            before = ckpt.get("identity") or {}
            diff = sorted(k for k in {**before, **self.identity} if before.get(k) != self.identity.get(k))
            what = f" (differs in {', '.join(diff)})" if before and diff else ""
            raise KDError(f"the checkpoint in {self.checkpoints.folder} belongs to another configuration{what}: "
                          f"remove {self.path}, or pass --resume=False to start over")
        if ckpt is None and self.resume == "True":
            raise KDError(f"--resume=True but there is no checkpoint in {self.checkpoints.folder}: run without "
                          "--resume to start (the default --resume=auto continues a checkpoint when one exists)")
        self.ckpt = ckpt
        return ckpt

    def check_inputs(self, inputs: dict) -> None:
        """A resumed run must see the inputs it was checkpointed with (e.g. the teachers' and the pool's sha256):
        a teacher republished between a stop and the rerun would switch the targets mid-run."""
        self.inputs = inputs
        before = (self.ckpt or {}).get("inputs")
        if before is not None and before != inputs:
            changed = ", ".join(sorted(k for k in {**before, **inputs} if before.get(k) != inputs.get(k)))
            raise KDError(f"the inputs of {self.path} changed since its checkpoint ({changed}: a teacher or pool "
                          "was republished?): restore them, or pass --resume=False to start over")

    # ----------------------------------------------------------------------------------------- run id
    def run_id(self) -> str:
        """The checkpoint's W&B run id, else the one this folder already started W&B with, else $WANDB_RUN_ID (as
        an agent sets it) or a new one; recorded in ``run.json`` before W&B sees it."""
        return self.ckpt["run_id"] if self.ckpt else recorded_run_id(self.path, self.main)

    # ----------------------------------------------------------------------------------------- writes
    def save(self, tensors: dict, info: dict, run_id: str, name: str | None = None) -> dict:
        """A checkpoint (main process only): tensors plus ``info``, with the identity, run id and inputs."""
        self.ckpt = self.checkpoints.save(tensors, {
            **info, "fingerprint": self.fingerprint, "identity": self.identity, "run_id": run_id,
            "inputs": self.inputs}, name=name)
        return self.ckpt

    def tensors(self, device: str = "cpu") -> dict:
        return self.checkpoints.tensors(device)

    def mark_done(self, info: dict) -> None:
        if self.main:
            write_json(self.path / DONE_FILE, info)
