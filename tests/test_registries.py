"""A new dataset and a new generator family, each added in this file alone (no file of kd/ changes): registered,
they train, distil, generate and report like the built-in ones, and every rerun says "already finished".

* the dataset ``stripes``: 3 classes of 8x8 images (a horizontal, a vertical or no stripe, with noise), its
  loader a function of this file (:func:`kd.datasets.register_dataset`);
* the generator family ``toy``: a "generator" that learns the mean training image and samples it with noise
  (:func:`kd.synthetic.families.register_family`: a preset, a :class:`~kd.synthetic.families.GeneratorJob`, a
  :class:`~kd.generators.Sampler` and how its export folder is recognised, :func:`kd.generators.register_sampler`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from kd import report
from kd.datasets import DATASETS, DatasetSpec, register_dataset
from kd.generators import SAMPLERS, SamplerKind
from kd.io import OBJECT, read_json, save_tensors, sha256_file, write_json
from kd.synthetic.families import FAMILIES, Family
from kd.wandb_runs import inspect_summary, offline_folders
from tests.conftest import run_main

STRIPES = "stripes"


def _stripes(data_dir: Path | None = None):
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 3, n)
        x = rng.normal(60, 20, (n, 3, 8, 8))
        x[y == 0, :, 3:5, :] += 150  # a horizontal stripe
        x[y == 1, :, :, 3:5] += 150  # a vertical one
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    return (*make(96), *make(48))


@dataclass(frozen=True)
class ToyPreset:
    batch_size: int = 16
    lr: float = 0.5
    g_steps: int = 6
    save_every: int = 3
    sample_every: int = 6
    noise: float = 0.1


class ToyJob:
    """Learns the mean training image (one parameter tensor), by SGD on the squared error."""

    export_dir, batches_per_step, channels = "toy", 1, 3

    def __init__(self, cfg):
        self.cfg, self.recipe = cfg, cfg.recipe()

    def auto_precision(self, cuda: bool) -> str:
        return "no"

    def total_steps(self, batches_per_epoch: int) -> int:
        return self.recipe.g_steps

    def build(self) -> None:
        self.mean = torch.nn.Parameter(torch.zeros(3, 8, 8))
        self.opt = torch.optim.SGD([self.mean], lr=self.recipe.lr)

    def n_params(self) -> int:
        return self.mean.numel()

    def state(self):
        return {"mean": self.mean.detach().clone()}, {}

    def load(self, tensors: dict, info: dict) -> None:
        with torch.no_grad():
            self.mean.copy_(tensors["mean"])

    def prepare(self, accelerator) -> None:
        pass

    def step(self, step, batches, generator, accelerator, total) -> dict:
        loss = ((batches(step) - self.mean) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"generator/loss": loss.item()}

    def extras(self) -> dict:
        return {}

    def grid(self, n: int, device) -> torch.Tensor:
        return ((self.mean.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(n, -1, -1, -1)

    def export(self, out: Path):
        folder = out / self.export_dir
        digest = save_tensors(folder / "toy.safetensors", {"mean": self.mean.detach().clone()})
        write_json(folder / "toy.json", {"kind": "toy", "sha256": digest, "noise": self.recipe.noise})
        return [folder / "toy.safetensors", folder / "toy.json"], {"weights_sha256": digest}


class ToySampler:
    kind = "toy"

    def __init__(self, folder: Path, cfg, device: torch.device):
        from kd.io import load_tensors

        self.info = read_json(folder / "toy.json", OBJECT)
        self.mean = load_tensors(folder / "toy.safetensors", self.info["sha256"])["mean"]
        self.device, self.fingerprint = device, sha256_file(folder / "toy.safetensors")

    def identity(self) -> dict:
        return {"model_sha256": self.fingerprint, "generator": "toy", "device": self.device.type, "dtype": "float32"}

    def describe(self) -> str:
        return "the toy family's mean image with noise"

    def __call__(self, ids, seed: int) -> torch.Tensor:
        from kd.generators.sampling import image_generators

        noise = torch.stack([torch.randn(3, 8, 8, generator=g) for g in image_generators(ids, seed)])
        return (self.mean + self.info["noise"] * noise).clamp(-1, 1)


def _toy_folder(path: Path) -> Path | None:
    for folder in (path, path / "toy"):
        if (folder / "toy.json").is_file():
            return folder
    return None


@pytest.fixture
def registered(monkeypatch):
    """Both registered for the test only (the registries are plain dicts)."""
    monkeypatch.setitem(DATASETS, STRIPES, DatasetSpec(STRIPES, 3, 8, 1, False, 96, 48, _stripes, family="digits"))
    toy = Family("toy", "a test's stand-in", lambda: {"toy": ToyPreset()}, lambda dataset: "toy", ToyJob)
    monkeypatch.setitem(FAMILIES, "toy", toy)
    monkeypatch.setitem(SAMPLERS, "toy", SamplerKind("toy", ToySampler, _toy_folder))
    yield
    assert register_dataset  # the public way to add one outside a test


def _main(cwd: Path, *args: str) -> int:
    return run_main(*args, cwd=cwd, env={"WANDB_MODE": "offline"})


def test_a_new_dataset_and_generator_family_go_through_the_whole_pipeline(registered, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the report too (another test's W&B settings may say logged in)
    tiny = ["--arch=preresnet8", "--batch_size=32", "--epochs=1", "--study=reg"]
    for seed in (0, 1):
        assert _main(tmp_path, "train.py", f"--dataset={STRIPES}", *tiny, f"--seed={seed}") == 0
    assert _main(tmp_path, "-m kd.synthetic", "train", "--generator=toy", f"--dataset={STRIPES}") == 0
    gen = tmp_path / "artifacts" / f"generator-{STRIPES}-toy" / "v0"
    assert sorted(json.loads((gen / "manifest.json").read_text())["files"]) == ["toy.json", "toy.safetensors"]
    pool_args = ["generate", f"--model=generator-{STRIPES}-toy", f"--dataset={STRIPES}", "--num=48", "--fid=False"]
    assert _main(tmp_path, "-m kd.synthetic", *pool_args) == 0
    pool = f"synthetic-{STRIPES}-generator-{STRIPES}-toy"
    for ratio in ("0", "0.5"):
        assert _main(tmp_path, "distill.py", f"--dataset={STRIPES}", *tiny, "--ensemble_size=2", "--teacher_pool=2",
                     f"--synthetic_ratio={ratio}", f"--synthetic_pool={pool}") == 0

    # every rerun: "already finished", nothing new in the store or in W&B
    runs_before = len(offline_folders(tmp_path))
    capsys.readouterr()
    assert _main(tmp_path, "-m kd.synthetic", "train", "--generator=toy", f"--dataset={STRIPES}") == 0
    assert _main(tmp_path, "-m kd.synthetic", *pool_args) == 0
    assert _main(tmp_path, "train.py", f"--dataset={STRIPES}", *tiny, "--seed=0") == 0
    assert capsys.readouterr().out.count("already finished") == 3
    assert len(offline_folders(tmp_path)) == runs_before
    assert [p.name for p in gen.parent.glob("v*")] == ["v0"]

    # the student's names, its pool's source and the report's groups and CSV
    (student,) = (tmp_path / "runs").glob(f"student-{STRIPES}-preresnet8-m2-t0-r0.5-T1-*")
    configs = [inspect_summary(f)["config"] for f in offline_folders(tmp_path)]
    synthetic = [c for c in configs if c.get("job") == "student" and c.get("synthetic_ratio") == 0.5]
    assert [c["synthetic_source"] for c in synthetic] == [f"generator-{STRIPES}-toy"]
    out = tmp_path / "figures"
    assert report.main(["--study=reg", "--offline", f"--out={out}", f"--wandb_dir={tmp_path}",
                        f"--cache_dir={tmp_path / 'cache'}"]) == 0
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["dataset"], r["synthetic_ratio"], r["synthetic_source"]) for r in rows] == [
        (STRIPES, "0.0", ""), (STRIPES, "0.5", f"generator-{STRIPES}-toy")]
    assert (out / "fig1.png").exists() and student.is_dir()
