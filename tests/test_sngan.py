"""kd.synthetic.sngan (the paper's SN-GAN) and kd.synthetic.quality (FID through torchmetrics), on the CPU, offline,
in seconds; then the SN-GAN through the commands: trained, killed and resumed bitwise, sampled into pools (sharded,
resumable, bit-identical, FID recorded) that distill.py takes."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.utils import parametrize

from kd import synthetic as syn
from kd.io import sha256_file
from kd.synthetic import quality, sngan
from kd.synthetic.quality import QualityUnavailable, fid, inception_score
from kd.synthetic.sngan import GAN_PRESETS, build_gan, d_hinge_loss, g_hinge_loss, sample, to_uint8
from tests.conftest import TINY, run_script
from tests.test_synthetic import no_inception_download


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    torch.manual_seed(0)


class TinyFeatures(nn.Module):
    """Deterministic stand-in for Inception: 4x4 average-pooled pixels (any H, W >= 4), times a fixed random
    projection to ``num_features`` dimensions. Takes uint8 [B, 3, H, W], as torchmetrics feeds custom models."""

    def __init__(self, num_features: int = 16):
        super().__init__()
        self.num_features = num_features
        g = torch.Generator().manual_seed(1234)
        self.register_buffer("proj", torch.randn(3 * 16, num_features, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(x.double() / 255.0, 4).flatten(1)
        return h @ self.proj


def _sn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ---------------------------------------------------------------- architecture


def test_spectral_norm_on_every_d_layer_and_none_in_g():
    g, d = build_gan("cifar10")
    d_layers, g_layers = _sn_layers(d), _sn_layers(g)
    assert len(d_layers) == 2 * 4 + 2 + 1  # 4 blocks x 2 convs, 2 shortcut 1x1 convs, the final linear
    assert all(parametrize.is_parametrized(m, "weight") for m in d_layers)
    assert not any(parametrize.is_parametrized(m) for m in g.modules())
    assert len(g_layers) == 1 + 3 * 3 + 1  # linear, 3 blocks x (2 convs + shortcut), output conv
    # the trainable tensor is the original weight; the power-iteration vectors are buffers, not parameters
    names = {n for n, _ in d.named_parameters()}
    assert "l_out.parametrizations.weight.original" in names and not any(n.endswith(("_u", "_v")) for n in names)
    assert any(n.endswith("._u") for n, _ in d.named_buffers())


def test_spectral_norm_makes_the_top_singular_value_one():
    _, d = build_gan("cifar10")
    d.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for _ in range(5):  # each train-mode forward runs one more power iteration (after 15 at wrapping time)
            d(x)
    for m in _sn_layers(d):
        w = m.weight.detach()  # the normalised weight W / sigma(W)
        sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.1), m
    g, _ = build_gan("cifar10")  # no normalisation in G: its 3x3 convs are far from norm 1 at Xavier init
    c1 = g.blocks[0].c1.weight.detach()
    assert torch.linalg.matrix_norm(c1.reshape(c1.shape[0], -1), ord=2).item() > 1.2


def test_hinge_losses_on_hand_made_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> mean 2.5 / 3; relu(1 + fake) = [0, 1, 2] -> mean 3 / 3 = 1
    assert d_hinge_loss(real, fake).item() == pytest.approx(2.5 / 3 + 1.0)
    # G: -mean(fake) = -(-2 + 0 + 1) / 3 = 1 / 3
    assert g_hinge_loss(fake).item() == pytest.approx(1.0 / 3)
    # confident D: every real logit >= 1 and every fake logit <= -1 -> zero loss
    assert d_hinge_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0


def test_shapes_and_range_at_32_px():
    g, d = build_gan("cifar100")
    z = torch.randn(3, 128)
    x = g(z)
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert d(x).shape == (3, 1)
    s = sample(g, z)
    assert g.training and s.shape == (3, 3, 32, 32) and s.abs().max() <= 1
    u = to_uint8(s)
    assert u.dtype == torch.uint8 and u.shape == s.shape
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]


def _conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout + cout


def _bn(c: int) -> int:
    return 2 * c


def test_cifar_parameter_counts_layer_by_layer():
    p = GAN_PRESETS["cifar10"]
    assert (p.z_dim, p.g_ch, p.d_ch, p.batch_size, p.n_dis, p.lr, p.betas, p.g_steps) == (
        128, 256, 128, 64, 5, 2e-4, (0.0, 0.9), 50_000)
    z, c, b = 128, 256, 4
    g_block = _bn(c) + _conv(3, c, c) + _bn(c) + _conv(3, c, c) + _conv(1, c, c)
    g_count = (z * c * b * b + c * b * b) + 3 * g_block + _bn(c) + _conv(3, c, 3)
    c = 128
    d_count = (_conv(3, 3, c) + _conv(3, c, c) + _conv(1, 3, c)  # optimized block, 1x1 shortcut
               + _conv(3, c, c) * 2 + _conv(1, c, c)  # down block, 1x1 shortcut
               + 2 * (_conv(3, c, c) * 2)  # two plain blocks, identity shortcut
               + (c + 1))  # linear -> 1
    g, d = build_gan(p)
    assert sum(q.numel() for q in g.parameters()) == g_count == 4_276_739
    assert sum(q.numel() for q in d.parameters()) == d_count == 1_053_825


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        sngan.Generator(image_size=24, bottom=4)
    with pytest.raises(ValueError, match="unknown GAN preset"):
        build_gan("imagenet")


# ---------------------------------------------------------------- training


def _digit_batches(n: int, batch: int) -> list[torch.Tensor]:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images).float()[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1], [N, 1, 8, 8]
    return [x[i * batch:(i + 1) * batch] for i in range(n)]


def test_digits_preset_trains_a_few_steps():
    p = GAN_PRESETS["digits"]
    assert p.image_size == 8 and p.channels == 1 and p.g_steps <= 1000
    g, d = build_gan(p)
    assert len(g.blocks) == 2 and g(torch.randn(2, p.z_dim)).shape == (2, 1, 8, 8)
    opt_g, opt_d = sngan.optimizers(p, g, d)
    assert opt_d.defaults["betas"] == (0.0, 0.9) and opt_g.defaults["lr"] == 2e-4
    before_g = [q.detach().clone() for q in g.parameters()]
    before_d = [q.detach().clone() for q in d.parameters()]
    reals = _digit_batches(3 * p.n_dis, 32)
    for i in range(3):
        d_loss, g_loss = sngan.train_step(g, d, opt_g, opt_d, reals[i * p.n_dis:(i + 1) * p.n_dis])
        assert torch.isfinite(torch.tensor([d_loss, g_loss])).all()
    assert any(not torch.equal(a, q) for a, q in zip(before_g, g.parameters()))
    assert any(not torch.equal(a, q) for a, q in zip(before_d, d.parameters()))
    ema = build_gan(p)[0]
    ema.load_state_dict(g.state_dict())
    sngan.ema_update(ema, g, 0.9)
    assert all(torch.equal(a, q) for a, q in zip(ema.parameters(), g.parameters()))
    assert to_uint8(sample(g, torch.randn(4, p.z_dim))).shape == (4, 1, 8, 8)


# ---------------------------------------------------------------- quality


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(40, 200, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("size", [8, 32])
def test_fid_plumbing_with_a_stand_in_extractor(size):
    real = _images(300, size)
    assert abs(fid(real.clone(), real, feature=TinyFeatures(), batch_size=64)) < 1e-3
    other = _images(300, size, seed=1)  # same distribution, other draws: small but not zero
    brighter = (real.int() + 50).clamp(0, 255).to(torch.uint8)
    near, far = fid(other, real, feature=TinyFeatures()), fid(brighter, real, feature=TinyFeatures())
    assert 0 < near < far and far > 10 * near


def test_fid_takes_one_channel_and_refuses_bad_input():
    grey = _images(50, 8)[:, :1]
    assert abs(fid(grey, grey.repeat(1, 3, 1, 1), feature=TinyFeatures())) < 1e-3
    with pytest.raises(ValueError, match="uint8"):
        fid(grey.float(), grey, feature=TinyFeatures())
    with pytest.raises(ValueError, match="at least 2"):
        fid(grey[:1], grey, feature=TinyFeatures())


def test_fid_without_inception_weights_raises_one_line(monkeypatch, tmp_path):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(fe, "load_state_dict_from_url", no_network)
    x = _images(4, 8)
    with pytest.raises(QualityUnavailable) as err:
        fid(x, x)
    msg = str(err.value)
    assert "\n" not in msg and "Inception weights" in msg and "URLError" in msg and "TORCH_HOME" in msg
    with pytest.raises(QualityUnavailable):
        inception_score(x, splits=2)


def test_missing_package_raises_quality_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)  # import fails as if not installed
    x = _images(4, 8)
    with pytest.raises(QualityUnavailable, match="pip install torchmetrics torch-fidelity") as err:
        quality.fid(x, x)
    assert "\n" not in str(err.value)


class _BrightnessClasses(nn.Module):
    """Confident logits over 4 classes picked by an image's mean brightness (stand-in classifier for IS)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = (x.double().mean(dim=(1, 2, 3)) / 64).long().clamp(0, 3)
        return 50.0 * F.one_hot(cls, 4).double()


def test_inception_score_with_a_stand_in_classifier():
    levels = torch.tensor([10, 80, 150, 220], dtype=torch.uint8).repeat(25)  # 25 images in each class
    pool = levels[:, None, None, None].expand(100, 3, 8, 8).contiguous()
    mean, std = inception_score(pool, feature=_BrightnessClasses(), splits=2)
    # confident predictions: IS = exp(entropy of the class marginal) per split; a balanced split gives exactly 4,
    # a random half of the pool nearly so
    assert mean == pytest.approx(4.0, abs=0.3) and 0 <= std < 0.3
    assert (mean, std) == inception_score(pool, feature=_BrightnessClasses(), splits=2)  # seeded split shuffle
    one_class = torch.full((20, 3, 8, 8), 10, dtype=torch.uint8)
    assert inception_score(one_class, feature=_BrightnessClasses(), splits=2) == pytest.approx((1.0, 0.0))
    with pytest.raises(ValueError, match="splits"):
        inception_score(pool, feature=_BrightnessClasses(), splits=1)


# ---------------------------------------------------------------- python -m kd.synthetic train --generator=sngan

GAN_TRAIN = ["train", "--generator=sngan", "--dataset=digits", "--max_steps=40", "--save_every=15",
             "--sample_every=1000", "--out=gen"]
GAN_WEIGHTS = "gen/generator/generator.safetensors"


@pytest.fixture(scope="module")
def trained_gan(tmp_path_factory) -> Path:
    """The digits SN-GAN trained 40 steps uninterrupted (a subprocess, as a user runs it); its folder."""
    folder = tmp_path_factory.mktemp("sngan")
    run_script("-m kd.synthetic", *GAN_TRAIN, cwd=folder, env={"WANDB_MODE": "disabled"})
    return folder


def test_digits_sngan_trains_exports_and_publishes(trained_gan):
    info = json.loads((trained_gan / "gen/generator/generator.json").read_text())
    assert info["kind"] == "sngan" and info["preset"]["image_size"] == 8 and info["preset"]["n_dis"] == 2
    assert info["sha256"] == sha256_file(trained_gan / GAN_WEIGHTS) and info["file"] == "generator.safetensors"
    state = json.loads((trained_gan / "gen/checkpoints/state.json").read_text())
    assert state["step"] == 40 and state["file"] == "step-00000040.safetensors"
    assert [p.name for p in (trained_gan / "gen/checkpoints").glob("step-*")] == ["step-00000040.safetensors"]
    assert [r["step"] for r in state["history"]] == [10, 20, 30, 40]
    assert all(math.isfinite(r["generator/d_loss"]) and math.isfinite(r["generator/g_loss"]) for r in state["history"])
    manifest = json.loads((trained_gan / "artifacts/generator-digits-sngan/v0/manifest.json").read_text())
    assert sorted(manifest["files"]) == ["generator.json", "generator.safetensors"]  # weights + JSON, no pickle
    assert manifest["metadata"]["generator"] == "sngan" and manifest["metadata"]["step"] == 40
    g, _ = sngan.load_generator(trained_gan / "gen/generator")
    assert not g.training and g(torch.randn(2, 32)).shape == (2, 1, 8, 8)
    assert (trained_gan / "gen/samples.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # a long end-to-end test: make chaos runs it
def test_digits_sngan_killed_then_resumed_has_the_same_weights(trained_gan, tmp_path):
    cut = run_script("-m kd.synthetic", *GAN_TRAIN, cwd=tmp_path, check=False,
                     env={"WANDB_MODE": "disabled", "KD_FAULT": "generator-step@35:KILL"})
    assert cut.returncode == -signal.SIGKILL, cut.stderr[-2000:]
    assert json.loads((tmp_path / "gen/checkpoints/state.json").read_text())["step"] == 30
    again = run_script("-m kd.synthetic", *GAN_TRAIN, cwd=tmp_path, env={"WANDB_MODE": "disabled"})
    assert "resuming" in again.stderr and "at step 30/300" in again.stderr
    a, b = load_file(str(tmp_path / GAN_WEIGHTS)), load_file(str(trained_gan / GAN_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    ck_a = load_file(str(tmp_path / "gen/checkpoints/step-00000040.safetensors"))
    ck_b = load_file(str(trained_gan / "gen/checkpoints/step-00000040.safetensors"))
    assert ck_a.keys() == ck_b.keys() and all(torch.equal(ck_a[k], ck_b[k]) for k in ck_a)  # D and Adam too


# ---------------------------------------------------------------- python -m kd.synthetic generate from an SN-GAN


@pytest.fixture
def gan_store(trained_gan, workdir, monkeypatch):
    """This test's folder (W&B offline), with the trained SN-GAN's artifact in its store; no Inception."""
    shutil.copytree(trained_gan / "artifacts", workdir / "artifacts")
    no_inception_download(monkeypatch, workdir)
    return workdir


def _gan_pool(**kw) -> syn.GenerateConfig:
    base = dict(model="generator-digits-sngan", dataset="digits", num=10, batch_size=3, shard_size=4, fid="False")
    return syn.GenerateConfig(**{**base, **kw})


def test_sngan_pool_is_sharded_resumable_and_bit_identical(gan_store):
    full = syn.generate(_gan_pool(out="full"))
    images, meta = syn.load_pool(str(full))
    assert images.shape == (10, 3, 8, 8) and torch.equal(images[:, 0], images[:, 2])  # grey in three channels
    assert meta["generator"] == "sngan" and meta["source"] == "generator-digits-sngan"
    assert meta["artifact"] == "synthetic-digits-generator-digits-sngan" and "scheduler" not in meta
    assert meta["fid"] is None and "--fid=False" in meta["fid_reason"]
    assert (full.parent / "grid.png").exists() and len(list((full.parent / "shards").glob("shard-*"))) == 3
    assert torch.equal(syn.load_pool("synthetic-digits-generator-digits-sngan")[0], images)  # by artifact name
    assert syn.generate(_gan_pool(out="cut"), stop_after_shards=1) is None
    assert sha256_file(syn.generate(_gan_pool(out="cut"))) == sha256_file(full)
    small = syn.generate(_gan_pool(out="small", num=5, batch_size=5, shard_size=5))  # other batching: a prefix
    assert torch.equal(syn.load_pool(str(small))[0], images[:5])
    other = syn.load_pool(str(syn.generate(_gan_pool(out="seed1", seed=1))))[0]
    assert not torch.equal(other, images)
    folder_pool = syn.generate(_gan_pool(model=str(gan_store / "artifacts/generator-digits-sngan/v0"), out="dir"))
    assert torch.equal(syn.load_pool(str(folder_pool))[0], images)  # the artifact folder itself, as --model


def test_pool_records_fid_with_a_stand_in_and_null_without_network(gan_store, capsys):
    pool = syn.generate(_gan_pool(out="q", num=40, fid="auto"), quality_feature=TinyFeatures())
    meta = json.loads((pool.parent / "pool.json").read_text())
    assert isinstance(meta["fid"], float) and math.isfinite(meta["fid"]) and meta["fid"] > 0
    assert isinstance(meta["inception_score"], float) and meta["inception_score"] >= 1.0
    assert meta["fid_features"] == "TinyFeatures" and meta["fid_real_images"] == 1437 and "fid_reason" not in meta
    manifest = json.loads((gan_store / "artifacts/synthetic-digits-generator-digits-sngan/v0/manifest.json")
                          .read_text())
    assert manifest["metadata"]["fid"] == meta["fid"]

    capsys.readouterr()
    pool = syn.generate(_gan_pool(out="no-net", num=40, fid="auto"))
    err = capsys.readouterr().err
    meta = json.loads((pool.parent / "pool.json").read_text())
    assert meta["fid"] is None and meta["inception_score"] is None and "Inception weights" in meta["fid_reason"]
    said = [line for line in err.splitlines() if "FID" in line or "Inception" in line]
    assert len(said) == 1 and said[0].startswith("note: the pool is made without FID"), err
    assert pool.exists() and syn.load_pool(str(pool))[0].shape == (40, 3, 8, 8)

    with pytest.raises(SystemExit) as e:  # FID demanded but impossible: refused before anything is sampled
        syn.main(["generate", "--model=generator-digits-sngan", "--dataset=digits", "--num=4", "--fid=True",
                  "--out=must"])
    assert e.value.code == 2 and "--fid=True but FID and IS need the Inception weights" in capsys.readouterr().err
    assert not (gan_store / "must").exists()


def test_sngan_pool_feeds_distill(gan_store, teachers_dir):
    pool = syn.generate(_gan_pool(out="pool", num=144, batch_size=64, shard_size=144))  # ratio 0.1 of 1437
    out = run_script("distill.py", *TINY, "--epochs=1", "--teachers=teacher-digits-preresnet8-s0",
                     "--synthetic_ratio=0.1", f"--synthetic_pool={pool}", cwd=gan_store,
                     env={"KD_STORE": str(teachers_dir / "artifacts")})
    assert "student test acc" in out.stdout
    (config,) = gan_store.glob("runs/student-digits-preresnet8-n1-r0.1-*/config.json")
    config = json.loads(config.read_text())
    assert config["n_synthetic"] == 144 and config["synthetic_pool_sha256"] == sha256_file(pool)
    assert config["synthetic_source"] == "generator-digits-sngan"
