"""kd.run_folder: the folder of one run, whatever trains in it: resume rules, checkpoints, run id, done marker.

(The lock between processes and planted markers: tests/test_confined.py; kills mid-write: tests/test_chaos.py.)
"""

from __future__ import annotations

import json

import pytest
import torch

from kd.errors import KDError
from kd.run_folder import DONE_FILE, RUN_ID_FILE, Layout, RunFolder


def _save(folder: RunFolder, step: int) -> dict:
    return folder.save({"w": torch.full((2,), float(step))}, {"step": step, "history": []}, folder.run_id())


def test_auto_resumes_a_checkpoint_of_the_same_identity_and_refuses_another(tmp_path):
    first = RunFolder(tmp_path / "run", {"lr": 0.1, "seed": 0})
    assert first.open() is None
    _save(first, 3)
    again = RunFolder(tmp_path / "run", {"lr": 0.1, "seed": 0})
    ckpt = again.open()
    assert ckpt["step"] == 3 and torch.equal(again.tensors()["w"], torch.full((2,), 3.0))
    other = RunFolder(tmp_path / "run", {"lr": 0.2, "seed": 0})
    with pytest.raises(KDError, match=r"belongs to another configuration \(differs in lr\)"):
        other.open()


def test_resume_true_needs_a_checkpoint_and_false_starts_over_with_a_new_run_id(tmp_path):
    with pytest.raises(KDError, match="--resume=True but there is no checkpoint"):
        RunFolder(tmp_path / "run", {"a": 1}, "True").open()
    folder = RunFolder(tmp_path / "run", {"a": 1})
    folder.open()
    _save(folder, 1)
    old_id = json.loads((tmp_path / "run" / RUN_ID_FILE).read_text())["run_id"]
    fresh = RunFolder(tmp_path / "run", {"a": 1}, "False")
    assert fresh.open() is None and not (tmp_path / "run" / RUN_ID_FILE).exists()
    assert fresh.run_id() != old_id


def test_done_counts_for_its_own_identity_only(tmp_path):
    """A folder named by its config alone (a generator's, a pool's) may be reused for another configuration:
    its marker says finished for the identity it was written for, not for the next one."""
    folder = RunFolder(tmp_path / "pool", {"num": 10})
    folder.open()
    folder.run_id()
    folder.mark_done({"run_id": folder.run_id(), "summary": {}})
    assert RunFolder(tmp_path / "pool", {"num": 10}).finished
    assert not RunFolder(tmp_path / "pool", {"num": 20}).finished
    assert json.loads((tmp_path / "pool" / DONE_FILE).read_text())["fingerprint"] == folder.fingerprint


def test_a_layout_keeps_checkpoints_where_it_says_and_requires_its_keys(tmp_path):
    layout = Layout(ckpt_dir="checkpoints", pointer="state.json", stem="step", required=("step",))
    folder = RunFolder(tmp_path / "gen", {"g": 1}, layout=layout)
    folder.open()
    folder.save({"w": torch.zeros(1)}, {"step": 5, "history": []}, folder.run_id(), name="step-00000005.safetensors")
    assert (tmp_path / "gen" / "checkpoints" / "state.json").exists()
    assert (tmp_path / "gen" / "checkpoints" / "step-00000005.safetensors").exists()
    pointer = tmp_path / "gen" / "checkpoints" / "state.json"
    info = json.loads(pointer.read_text())
    del info["step"]
    pointer.write_text(json.dumps(info))
    with pytest.raises(KDError):
        RunFolder(tmp_path / "gen", {"g": 1}, layout=layout).open()
