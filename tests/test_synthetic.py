"""kd.synthetic: pools from a tiny random DDPM (loaded by path, as a hub id would be), resume, hashes, errors,
and a 2-step generator training run. Offline W&B; everything is written under tmp_path."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd import synthetic as syn
from kd.artifacts import local_versions
from kd.errors import KDError
from kd.io import owner_tag, sha256_file
from tests.conftest import no_inception_download

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("KD_STORE", str(tmp_path / "artifacts"))
    no_inception_download(monkeypatch, tmp_path)


def _tiny_pipeline(folder: Path, size: int) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=20)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory) -> Path:
    return _tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny8", 8)


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory) -> Path:
    return _tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny16", 16)


def _cfg(model: Path, **kw) -> syn.GenerateConfig:
    base = dict(model=str(model), dataset="digits", num=6, scheduler="ddim", steps="3", batch_size=4,
                shard_size=4, source="tiny")
    return syn.GenerateConfig(**{**base, **kw})


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm"])
def test_each_scheduler_makes_a_verified_pool(tiny8, scheduler):
    steps = "auto" if scheduler == "ddpm" else "3"  # ddpm: all 20 training timesteps of the tiny model
    pool = syn.generate(_cfg(tiny8, scheduler=scheduler, steps=steps, out=f"out-{scheduler}"))
    images, meta = syn.load_pool(str(pool))
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 8, 8)
    assert meta["scheduler"] == scheduler and meta["steps"] == (20 if scheduler == "ddpm" else 3)
    assert meta["sha256"] == sha256_file(pool) and meta["count"] == 6 and meta["dataset"] == "digits"
    assert images.float().std() > 0  # not a constant image


def test_resize_metadata_grid_and_artifact(tiny16, tmp_path):
    pool = syn.generate(_cfg(tiny16, num=5))  # a 16 px model for the 8 px digits
    assert pool.resolve() == tmp_path / "runs/synthetic/digits-tiny/pool.safetensors"
    images, meta = syn.load_pool(str(pool.parent))
    assert images.shape == (5, 3, 8, 8)
    for key in ("model", "scheduler", "steps", "seed", "count", "dataset", "height", "width", "sha256", "source"):
        assert key in meta, key
    assert (meta["height"], meta["width"], meta["source"], meta["model"]) == (8, 8, "tiny", str(tiny16))
    assert (pool.parent / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert local_versions("synthetic-digits-tiny") is not None
    by_name, meta2 = syn.load_pool("synthetic-digits-tiny")
    assert torch.equal(by_name, images) and meta2["sha256"] == meta["sha256"]
    assert list(tmp_path.glob("wandb/offline-run-*")), "an offline W&B run was written"


def test_to_pixels_resizes_with_antialiasing_and_expands_grey():
    x = torch.full((2, 1, 16, 16), 0.5)
    x[:, :, :, ::2] = -1.0  # stripes: antialiased downsampling averages them to mid-grey
    px = syn.to_pixels(x, 8, 8)
    assert px.shape == (2, 3, 8, 8) and px.dtype == torch.uint8
    assert torch.equal(px[:, 0], px[:, 2]) and 60 < px.float().mean() < 140


def test_corrupt_or_missing_pool_is_refused(tiny8):
    pool = syn.generate(_cfg(tiny8, num=4))
    raw = bytearray(pool.read_bytes())
    raw[-1] ^= 0xFF
    pool.write_bytes(bytes(raw))
    with pytest.raises(KDError, match="corrupt"):
        syn.load_pool(str(pool))
    pool.unlink()
    with pytest.raises(KDError, match="missing"):
        syn.load_pool(str(pool))
    with pytest.raises(KDError, match="no synthetic pool 'synthetic-digits-nothing'"):
        syn.load_pool("synthetic-digits-nothing")


def test_interrupted_generation_resumes_bit_identical(tiny8, tmp_path):
    full = syn.generate(_cfg(tiny8, num=10, batch_size=2, out="full"))  # shards of 4, 4, 2
    assert syn.generate(_cfg(tiny8, num=10, batch_size=2, out="cut"), stop_after_shards=1) is None
    shards = tmp_path / "cut/shards"
    assert sorted(p.name for p in shards.glob("shard-*")) == ["shard-00000.safetensors"]
    assert not (tmp_path / "cut/pool.safetensors").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = shards / f".shard-00001.safetensors.{owner_tag().split('-')[0]}-{dead.pid}.abc.tmp"
    stale.write_bytes(b"half")  # what a kill mid-write leaves (its writer is gone)
    resumed = syn.generate(_cfg(tiny8, num=10, batch_size=2, out="cut"))
    assert sha256_file(resumed) == sha256_file(full)
    assert not list(shards.glob(".*.tmp"))

    (shards / "shard-00001.safetensors").write_bytes(b"garbage")  # a corrupt shard is made again
    assert syn.generate(_cfg(tiny8, num=10, batch_size=2, out="cut")) == resumed  # "already finished"
    again = syn.generate(_cfg(tiny8, num=10, batch_size=2, out="cut", resume="False"))
    assert sha256_file(again) == sha256_file(full)

    prefix = syn.generate(_cfg(tiny8, num=6, batch_size=2, out="small"))  # a smaller pool is a prefix
    assert torch.equal(syn.load_pool(str(prefix))[0], syn.load_pool(str(full))[0][:6])

    with pytest.raises(KDError, match="another generation"):
        syn.generate(_cfg(tiny8, num=10, batch_size=2, out="cut", seed=1))


def test_hub_id_that_cannot_be_fetched_names_the_fix(tiny8):
    with pytest.raises(KDError, match=r"no-such-org/no-such-ddpm.*--model=PATH.*python -m kd\.synthetic train"):
        syn.generate(syn.GenerateConfig(model="no-such-org/no-such-ddpm", dataset="digits", num=4))


@pytest.mark.parametrize("args, message", [
    (["generate", "--dataset=mnist"], "unknown dataset 'mnist'"),
    (["generate", "--dataset=digits", "--num=0"], "--num must be >= 1"),
    (["generate", "--dataset=digits", "--steps=0"], "--steps must be >= 1"),
    (["generate", "--dataset=digits", "--scheduler=euler"], "unknown scheduler 'euler'"),
    (["generate", "--dataset=digits", "--model=not-a-pipeline"], "not a loadable diffusers DDPM pipeline"),
    (["generate", "--dataset=digits", "--model=generator-nothing"], "no generator 'generator-nothing'"),
    (["train", "--dataset=digits", "--preset=huge"], "unknown preset 'huge'"),
    (["sample"], "unknown command 'sample'"),
])
def test_cli_errors_are_one_line_with_exit_code_2(args, message, tmp_path, capsys):
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(SystemExit) as e:
        syn.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err


def test_cli_generate_default_layout(tiny8, tmp_path):
    syn.main(["generate", f"--model={tiny8}", "--dataset=digits", "--num=3", "--scheduler=dpm", "--steps=2"])
    out = tmp_path / "runs/synthetic/digits-tiny8"
    meta = json.loads((out / "pool.json").read_text())
    assert meta["source"] == "tiny8" and meta["artifact"] == "synthetic-digits-tiny8"
    assert (out / "shards/index.json").exists() and (out / "grid.png").exists()
    images, _ = syn.load_pool("synthetic-digits-tiny8")
    assert images.shape == (3, 3, 8, 8)


def test_load_pool_signature_is_the_contract():
    assert list(inspect.signature(syn.load_pool).parameters) == ["ref", "store", "run"]


@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_train_two_steps_then_resume_then_generate(tmp_path, capsys, fresh_accelerate):
    from diffusers import DDPMPipeline

    syn.main(["train", "--dataset=digits", "--max_steps=2", "--out=gen"])
    state = json.loads((tmp_path / "gen/checkpoints/state.json").read_text())
    assert state["step"] == 2
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "gen/pipeline"))
    assert pipe.unet.config.sample_size == 8 and (tmp_path / "gen/samples.png").exists()
    assert local_versions("generator-digits") is not None

    syn.main(["train", "--dataset=digits", "--max_steps=3", "--out=gen"])
    assert "resuming" in capsys.readouterr().err
    assert json.loads((tmp_path / "gen/checkpoints/state.json").read_text())["step"] == 3
    assert len(list((tmp_path / "gen/checkpoints").glob("step-*.safetensors"))) == 1

    pool = syn.generate(syn.GenerateConfig(model="generator-digits", dataset="digits", num=4, steps="2"))
    images, meta = syn.load_pool(str(pool))
    assert images.shape == (4, 3, 8, 8) and meta["source"] == "generator-digits"
    assert torch.equal(images[:, 0], images[:, 1])  # a one-channel model, grey in three channels

    # each job's stored W&B config comes back as flags (as `wandb agent` passes it on resume) and parses
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from kd.flags import parse_flags
    from kd.wandb_runs import inspect_summary, offline_folders

    jobs = {}
    for folder in offline_folders(tmp_path):
        config = inspect_summary(folder)["config"]
        flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in config.items()}})["args"]
        cls = syn.GeneratorTrainConfig if "recipe" in config else syn.GenerateConfig
        jobs[cls.__name__] = parse_flags(cls, flags)
    assert jobs["GeneratorTrainConfig"].artifact_name() == "generator-digits"
    assert jobs["GenerateConfig"].model == "generator-digits" and jobs["GenerateConfig"].num == 4
