"""On a CUDA device (``make test-gpu``; deselected by ``make test`` and ``make chaos``): the compiled and the
CUDA-graph step equal the eager step within bf16 rounding, a fused pack equals its plain runs in bf16, a run
stopped on CUDA resumes where it stopped, and (where two GPUs are visible) two processes train over NCCL.

Tolerances: a relative L2 error of ``C * eps(bf16) * sqrt(n)`` over ``n`` rounded layers (the forward's
convolutions; twice as many for a gradient), as independent roundings of relative size eps add up in
quadrature; C = 8 covers bf16's round-to-nearest of sums that differ in their order of accumulation.
"""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
from torch import nn

from tests.conftest import ROOT, run_script, tiny

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
EPS = torch.finfo(torch.bfloat16).eps


def convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def one_step(model, forward, x, y):
    """Logits and the SGD update of every parameter after one bf16 step on (x, y)."""
    from kd.config import TrainConfig
    from kd.optim import optimizer

    opt = optimizer(model.parameters(), TrainConfig())
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = forward(x)
    nn.functional.cross_entropy(logits.float(), y).backward()
    opt.step()
    return logits.detach().float().clone(), [p.detach() - b for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_the_compiled_and_the_graphed_step_equal_the_eager_step_in_bf16(mode):
    from kd.accel import StaticCompiled
    from kd.models import build_model

    torch.manual_seed(0)
    base = build_model("preresnet20", 10).to(CUDA).to(memory_format=torch.channels_last).train()
    x = torch.randn(64, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), device=CUDA)
    eager_model, compiled_model = copy.deepcopy(base), copy.deepcopy(base)
    logits_e, update_e = one_step(eager_model, eager_model, x, y)
    compiled = StaticCompiled(compiled_model, mode)
    logits_c, update_c = one_step(compiled_model, compiled, x, y)
    assert compiled.compiled_calls == 1 and compiled.eager_calls == 0
    n = convs(base)
    assert rel(logits_c, logits_e) <= 8 * EPS * math.sqrt(n)
    for uc, ue in zip(update_c, update_e):
        assert rel(uc, ue) <= 8 * EPS * math.sqrt(2 * n)


def test_a_fused_pack_equals_its_plain_runs_in_bf16():
    from kd.fused import FusedPreResNet
    from kd.models import build_model

    torch.manual_seed(0)
    k, b = 4, 32
    models = [build_model("preresnet20", 10).to(CUDA).to(memory_format=torch.channels_last).train()
              for _ in range(k)]
    fused = FusedPreResNet.from_members([copy.deepcopy(m) for m in models])
    xs = torch.randn(k, b, 3, 32, 32, device=CUDA)
    ys = torch.randint(0, 10, (k, b), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pack = fused(xs).float()
        plain = torch.stack([m(xs[i].contiguous(memory_format=torch.channels_last)).float()
                             for i, m in enumerate(models)])
    n = convs(models[0])
    for i in range(k):
        assert rel(pack[i], plain[i]) <= 8 * EPS * math.sqrt(n)
    sum(nn.functional.cross_entropy(pack[i], ys[i]) for i in range(k)).backward()
    for i, m in enumerate(models):
        nn.functional.cross_entropy(plain[i], ys[i]).backward()
        grads = dict(m.named_parameters())
        for name, p in fused.named_parameters():
            mine = fused.member_view(name, p.grad)[i]
            assert rel(mine, grads[name].grad.reshape(mine.shape)) <= 8 * EPS * math.sqrt(2 * n), name


def test_a_run_stopped_on_cuda_resumes_where_it_stopped(tmp_path):
    args = [*tiny(batch_size=64), "--epochs=3", "--seed=1"]  # 23 steps an epoch; CUDA's defaults: bf16, compiled
    out = run_script("train.py", *args, cwd=tmp_path, check=False, env={"KD_FAULT": "train-step@30:TERM"})
    assert out.returncode == 143, out.stderr[-2000:]
    ckpt = json.loads(next(tmp_path.glob("runs/*/checkpoint.json")).read_text())
    assert (ckpt["epoch"], ckpt["step"]) == (1, 7)
    out = run_script("train.py", *args, cwd=tmp_path)
    assert "resuming" in out.stdout and "at epoch 1 step 7" in out.stdout
    done = json.loads(next(tmp_path.glob("runs/*/done.json")).read_text())
    assert done["run_id"] == ckpt["run_id"]


@pytest.mark.gpus2
def test_two_processes_train_over_nccl(tmp_path):
    assert torch.cuda.device_count() >= 2, "make test-gpu runs this test where two GPUs are visible"
    cmd = [sys.executable, "-m", "kd.sweep.elastic", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *tiny(), "--epochs=1"]
    import os
    import subprocess

    from tests.conftest import offline_env

    env = {k: v for k, v in {**os.environ, **offline_env(tmp_path), "NCCL_DEBUG": "INFO"}.items()
           if k not in ("WANDB_RUN_ID", "WANDB_SERVICE", "KD_NUM_PROCESSES")}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "NCCL INFO" in out.stdout + out.stderr  # the processes joined over NCCL
    assert sorted(p.name for p in (tmp_path / "artifacts" / "teacher-digits-preresnet8-s0").glob("v*")) == ["v0"]
