"""kd.checkpoint: one safetensors checkpoint for every trainer; the pointer JSON commits it."""

from __future__ import annotations

import json

import pytest
import torch

from kd.checkpoint import Checkpoints, load_state_tensors, state_tensors
from kd.config import DistillConfig
from kd.errors import KDError
from kd.models import build_model
from kd.optim import optimizer


def _stepped(seed: int):
    torch.manual_seed(seed)
    model = build_model("preresnet8", 10)
    opt = optimizer(model.parameters(), DistillConfig())
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()
    return model, opt


def test_model_and_optimizer_round_trip_bitwise(tmp_path):
    model, opt = _stepped(0)
    tensors, info = state_tensors(model, opt)
    ckpt = Checkpoints(tmp_path)
    ckpt.save(tensors, {**info, "epoch": 1})
    other, other_opt = _stepped(1)
    loaded = Checkpoints(tmp_path)
    assert loaded.load("fix it")["epoch"] == 1
    load_state_tensors(loaded.tensors(), loaded.info, other, other_opt)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k  # BN statistics and counts included
    mine, theirs = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert mine.keys() == theirs.keys() and len(mine) == len(list(model.parameters()))
    for i in mine:
        assert torch.equal(mine[i]["momentum_buffer"], theirs[i]["momentum_buffer"]), i


def test_the_pointer_commits_and_only_the_newest_file_stays(tmp_path):
    ckpt = Checkpoints(tmp_path)
    ckpt.save({"w": torch.zeros(3)}, {"step": 1})
    ckpt.save({"w": torch.ones(3)}, {"step": 2})
    assert [p.name for p in tmp_path.glob("ckpt-*.safetensors")] == ["ckpt-2.safetensors"]
    again = Checkpoints(tmp_path)
    assert again.load("fix")["step"] == 2 and torch.equal(again.tensors()["w"], torch.ones(3))


@pytest.mark.parametrize("damage", ["pointer", "tensors", "missing"])
def test_a_damaged_checkpoint_is_refused_never_replaced(tmp_path, damage):
    ckpt = Checkpoints(tmp_path, required=("file", "sha256", "step"))
    ckpt.save({"w": torch.zeros(3)}, {"step": 1})
    if damage == "pointer":
        (tmp_path / "checkpoint.json").write_text(json.dumps({"file": "ckpt-1.safetensors"}))
    elif damage == "tensors":
        (tmp_path / "ckpt-1.safetensors").write_bytes(b"not the tensors")
    else:
        (tmp_path / "ckpt-1.safetensors").unlink()
    with pytest.raises(KDError, match="pass --resume=False"):
        Checkpoints(tmp_path, required=("file", "sha256", "step")).load("pass --resume=False")
