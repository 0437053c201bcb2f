"""The "auto" settings: resolved per device (bf16, compiled with CUDA graphs, sparser evaluations and checkpoints
on CUDA; the float32 eager loop evaluating and checkpointing every epoch elsewhere), explicit values kept, and a
CPU run's fingerprint what it was before the settings became "auto"."""

import dataclasses

import pytest
import torch

from kd.config import DistillConfig, TrainConfig, resolve_device_defaults
from kd.flags import parse_flags

CPU = {"mixed_precision": "no", "compile": "False", "compile_mode": "default", "eval_every": 1,
       "checkpoint_every_s": 0.0}
CUDA = {"mixed_precision": "bf16", "compile": "True", "compile_mode": "reduce-overhead", "eval_every": 5,
        "checkpoint_every_s": 600.0}


def picked(cfg) -> dict:
    return {k: getattr(cfg, k) for k in CPU}


@pytest.mark.parametrize("cls", [TrainConfig, DistillConfig])
def test_auto_resolves_per_device(cls):
    assert picked(resolve_device_defaults(cls(), cuda=False)) == CPU
    assert picked(resolve_device_defaults(cls(), cuda=True)) == CUDA


def test_explicit_values_are_kept_and_fp32_is_the_authors_float32():
    cfg = parse_flags(TrainConfig, ["--mixed_precision=fp32", "--compile=False", "--eval_every=3",
                                    "--checkpoint_every_s=0", "--compile_mode=max-autotune"])
    on_cuda = resolve_device_defaults(cfg, cuda=True)
    assert picked(on_cuda) == {"mixed_precision": "no", "compile": "False", "compile_mode": "max-autotune",
                               "eval_every": 3, "checkpoint_every_s": 0.0}


def test_this_machine_resolves_with_a_stand_in_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert picked(resolve_device_defaults(TrainConfig())) == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert picked(resolve_device_defaults(TrainConfig())) == CUDA
    assert picked(resolve_device_defaults(TrainConfig(cpu=True))) == CPU  # --cpu wins over the GPU


def test_the_fingerprint_records_the_resolved_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = TrainConfig()
    assert auto.identity()["mixed_precision"] == "no"
    # a CPU run keeps the fingerprint of its float32 runs from before; fp32 and no are one arithmetic
    assert auto.fingerprint() == TrainConfig(mixed_precision="no").fingerprint() \
        == TrainConfig(mixed_precision="fp32").fingerprint() == resolve_device_defaults(auto).fingerprint()
    assert "eval_every" not in auto.identity() and "checkpoint_every_s" not in auto.identity()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto.identity()["mixed_precision"] == "bf16"
    assert auto.fingerprint() == TrainConfig(mixed_precision="bf16").fingerprint() != \
        TrainConfig(mixed_precision="fp32").fingerprint()


def test_cpu_sgd_is_torchs_default_kernel():
    from kd.optim import optimizer

    opt = optimizer(torch.nn.Linear(2, 2).parameters(), TrainConfig())
    assert not opt.defaults.get("fused") and opt.defaults["nesterov"] is False


def test_the_resolution_changes_nothing_else():
    cfg = DistillConfig(temperature=4.0, trial=2)
    out = resolve_device_defaults(cfg, cuda=True)
    same = {f.name for f in dataclasses.fields(cfg)} - set(CPU)
    assert all(getattr(out, k) == getattr(cfg, k) for k in same)
