"""``python -m kd.sweep.prereqs`` (what ``make sweep`` runs before ``wandb sweep``): every input a spec's runs
resolve is looked up where the runs will look, and a missing one is one line naming the command that makes it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kd.sweep import prereqs
from tests.conftest import ROOT, snapshot
from tests.test_distill import write_pool

SPEC = """\
program: distill.py
method: grid
metric: {{name: test/agreement, goal: maximize}}
parameters:
  dataset: {{value: digits}}
  arch: {{value: preresnet8}}
  epochs: {{value: 1}}
  teacher_pool: {{value: 3}}
  ensemble_size: {{value: 3}}
  synthetic_pool: {{value: {pool}}}
  synthetic_ratio: {{values: [0.0, 0.5]}}
  trial: {{values: [0, 1]}}
command:
  - ${{env}}
  - ${{interpreter}}
  - -m
  - kd.sweep.launch
  - ${{program}}
  - ${{args}}
"""


def spec(folder: Path, pool: str) -> Path:
    path = folder / "students.yaml"
    path.write_text(textwrap.dedent(SPEC.format(pool=pool)))
    return path


def test_a_spec_whose_inputs_are_missing_is_refused_naming_each_and_its_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("KD_STORE", str(tmp_path / "store"))
    path = spec(tmp_path, "synthetic-digits-test")
    before = snapshot(tmp_path)
    assert prereqs.main([str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [ln.split(" (")[0] for ln in err[:-1]] == [
        "error: missing teacher-digits-preresnet8-s0", "error: missing teacher-digits-preresnet8-s1",
        "error: missing teacher-digits-preresnet8-s2", "error: missing synthetic-digits-test"]
    assert err[0].endswith(f"python -m kd.sweep {tmp_path / 'teachers.yaml'}")
    n = round(0.5 * 1437)  # digits: 1437 training images; trial 1 takes the second block
    assert f"--num={2 * n}" in err[3] and "needed by student-digits-preresnet8-m3-t0-r0.5-T1 and 1 more runs" in err[3]
    assert "4 input(s) missing" in err[-1] and "no sweep was created" in err[-1]
    assert snapshot(tmp_path) == before  # nothing written


def test_a_pool_too_small_for_the_trials_blocks_is_missing_and_enough_passes(tmp_path, teachers_dir, monkeypatch,
                                                                           capsys):
    import torch

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("KD_STORE", str(teachers_dir / "artifacts"))
    n = round(0.5 * 1437)
    small = write_pool(tmp_path / "small", torch.zeros(2 * n - 1, 3, 8, 8, dtype=torch.uint8))
    assert prereqs.main([str(spec(tmp_path, str(small)))]) == 2
    (line, _) = capsys.readouterr().err.splitlines()
    assert f"holds {2 * n - 1} images, the trials' blocks need {2 * n}" in line
    enough = write_pool(tmp_path / "enough", torch.zeros(2 * n, 3, 8, 8, dtype=torch.uint8))
    assert prereqs.main([str(spec(tmp_path, str(enough)))]) == 0
    assert "every run finds its inputs (local store)" in capsys.readouterr().out


def test_online_the_inputs_are_looked_up_in_the_sweeps_wandb_project(tmp_path, monkeypatch, capsys):
    """With a login the lookup is wandb's own Api.artifact_exists (its network call replaced: a CommError for an
    artifact the project lacks), in the entity/project given."""
    import wandb
    from wandb.apis.public import Api
    from wandb.apis.public.service_api import ServiceApi
    from wandb.proto import wandb_api_pb2 as apb

    def server(service_api, request, timeout=None):  # the credentials check passes; no other request is made
        assert request.WhichOneof("request") != "graphql_request", request
        return apb.ApiResponse()

    asked = []

    def lookup(self, name, type=None):
        asked.append((name, type))
        if "s1" in name:
            raise wandb.errors.CommError("artifact not found")
        return object()

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(Api, "_artifact", lookup)
    monkeypatch.setattr(ServiceApi, "send_api_request", server)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    path = spec(tmp_path, "synthetic-digits-test")
    assert prereqs.main([str(path), "--entity=me", "--project=kd"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("error: missing teacher-digits-preresnet8-s1 (missing in the W&B "
                                               "project me/kd;")
    assert f"wandb sweep {tmp_path / 'teachers.yaml'}" in err[0]
    assert ("me/kd/synthetic-digits-test:latest", "dataset") in asked
    assert ("me/kd/teacher-digits-preresnet8-s0:latest", "model") in asked


@pytest.mark.parametrize("name,command", [
    ("generator-cifar100-gnosis-e300", "python -m kd.synthetic import --source=gnosis --dataset=cifar100 --epoch=300"),
    ("generator-cifar10-sngan", "python -m kd.synthetic train --generator=sngan --dataset=cifar10"),
    ("generator-cifar10", "python -m kd.synthetic train --dataset=cifar10")])
def test_each_generator_kind_names_the_command_that_makes_it(name, command):
    dataset = name.split("-")[1]
    assert prereqs._make_generator(name, dataset) == command


def test_make_sweep_checks_before_wandb_sweep():
    text = (ROOT / "Makefile").read_text()
    recipe = text.split("\nsweep:", 1)[1].split("\n\n", 1)[0]
    assert recipe.index("kd.sweep.prereqs $(SPEC)") < recipe.index("wandb sweep $(SPEC)")
    assert "&&" in recipe.split("kd.sweep.prereqs $(SPEC)", 1)[1].split("wandb sweep", 1)[0]
