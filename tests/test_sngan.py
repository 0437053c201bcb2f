"""kd.generators.sngan (the paper's SN-GAN) and kd.synthetic.quality (FID through torchmetrics), on the CPU, offline,
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
from kd.errors import KDError
from kd.generators import sngan
from kd.generators.sngan import GAN_PRESETS, build_gan, d_hinge_loss, g_hinge_loss, sample, to_uint8
from kd.io import sha256_file
from kd.synthetic import quality
from kd.synthetic.quality import QualityUnavailable, fid, inception_score
from tests.conftest import TINY, assert_close_as, no_inception_download, run_main, run_script


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
    g, d = build_gan("miyato")
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
    _, d = build_gan("miyato")
    d.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for _ in range(5):  # each train-mode forward runs one more power iteration (after 15 at wrapping time)
            d(x)
    for m in _sn_layers(d):
        w = m.weight.detach()  # the normalised weight W / sigma(W)
        sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.1), m
    g, _ = build_gan("miyato")  # no normalisation in G: its 3x3 convs are far from norm 1 at Xavier init
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


@pytest.mark.parametrize("preset", ["gnosis-a3", "gnosis-fig1", "miyato"])
def test_shapes_and_range_at_32_px(preset):
    g, d = build_gan(preset)
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
    p = GAN_PRESETS["miyato"]
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
        sngan.Generator(sngan.GeneratorShape(image_size=24, bottom=4))
    with pytest.raises(ValueError, match="unknown GAN preset"):
        build_gan("imagenet")


# The two reference architectures as their authors' code builds them, one entry per layer that has parameters:
# ("linear", in, out, bias), ("conv", k, in, out) (always with a bias), ("bn", channels). Transcribed from the code
# (module by module), not from kd.generators.sngan, so the counts below are an independent check.


def _gnosis_layers(z: int = 128, k_g: int = 256, k_d: int = 128, img: int = 3) -> tuple[list, list]:
    """samuelstanton/gnosis gnosis/models/sngan.py with config/density_model/sngan.yaml (G k=256, D k=128)."""
    g = [("linear", z, 4 * 4 * k_g, True)]  # nn.Linear(z_dim, 4 * 4 * k)
    for _ in range(3):  # ResBlockGenerator(k, k, stride=2): BN, ReLU, Upsample, Conv3, BN, ReLU, Conv3;
        g += [("bn", k_g), ("conv", 3, k_g, k_g), ("bn", k_g), ("conv", 3, k_g, k_g)]  # bypass: in == out, none
    g += [("bn", k_g), ("conv", 3, k_g, img)]  # BatchNorm2d(k), ReLU, Conv2d(k, img_channels, 3), Tanh
    d = [("conv", 3, img, k_d), ("conv", 3, k_d, k_d), ("conv", 1, img, k_d)]  # FirstResBlockDiscriminator
    for _ in range(3):  # ResBlockDiscriminator(k, k, stride=2), (k, k), (k, k): bypass in == out, none
        d += [("conv", 3, k_d, k_d), ("conv", 3, k_d, k_d)]
    d += [("linear", k_d, 1, True)]  # ReLU, AvgPool2d(8), nn.Linear(k, out_size=1)
    return g, d


def _miyato_layers(z: int = 128, ch_g: int = 256, ch_d: int = 128, img: int = 3) -> tuple[list, list]:
    """pfnet-research/sngan_projection gen_models/resnet_32.py, dis_models/snresnet_32.py and their resblocks.py
    (configs/sn_cifar10_unconditional.yml: ch 256 / 128, bottom_width 4)."""
    g = [("linear", z, 4 * 4 * ch_g, True)]  # l1
    for _ in range(3):  # Block(ch, ch, upsample=True): b1, c1, b2, c2 and c_sc (learnable_sc: upsample)
        g += [("bn", ch_g), ("conv", 3, ch_g, ch_g), ("bn", ch_g), ("conv", 3, ch_g, ch_g), ("conv", 1, ch_g, ch_g)]
    g += [("bn", ch_g), ("conv", 3, ch_g, img)]  # b5, c5
    d = [("conv", 3, img, ch_d), ("conv", 3, ch_d, ch_d), ("conv", 1, img, ch_d)]  # OptimizedBlock: c1, c2, c_sc
    d += [("conv", 3, ch_d, ch_d), ("conv", 3, ch_d, ch_d), ("conv", 1, ch_d, ch_d)]  # Block(downsample=True)
    for _ in range(2):  # Block(ch, ch, downsample=False): learnable_sc False
        d += [("conv", 3, ch_d, ch_d), ("conv", 3, ch_d, ch_d)]
    d += [("linear", ch_d, 1, False)]  # l5 = SNLinear(ch, 1, nobias=True)
    return g, d


def _shapes(layers: list) -> list[tuple]:
    """The parameter tensors' shapes (torch's layout) of a layer list."""
    out = []
    for kind, *a in layers:
        if kind == "linear":
            out += [(a[1], a[0])] + ([(a[1],)] if a[2] else [])
        elif kind == "conv":
            out += [(a[2], a[1], a[0], a[0]), (a[2],)]
        else:
            out += [(a[0],), (a[0],)]
    return sorted(out)


def _numel(shapes: list[tuple]) -> int:
    return sum(math.prod(s) for s in shapes)


def _own_shapes(model: nn.Module) -> list[tuple]:
    return sorted(tuple(q.shape) for q in model.parameters())


@pytest.mark.parametrize("preset, reference, ours_only, counts", [
    ("gnosis-a3", _gnosis_layers, [], (4_079_363, 1_037_313)),
    ("gnosis-fig1", _gnosis_layers, [], (4_079_363, 1_037_313)),
    # the one difference from sngan_projection: D's last linear has a bias here (as in Mimicry)
    ("miyato", _miyato_layers, [(1,)], (4_276_739, 1_053_825))])
def test_parameter_counts_match_the_authors_layer_lists(preset, reference, ours_only, counts):
    g_ref, d_ref = map(_shapes, reference())
    g, d = build_gan(preset)
    assert _own_shapes(g) == g_ref and sum(q.numel() for q in g.parameters()) == _numel(g_ref)
    assert _own_shapes(d) == sorted(d_ref + ours_only)
    assert sum(q.numel() for q in d.parameters()) == _numel(d_ref) + _numel(ours_only)
    assert (_numel(g_ref), _numel(d_ref) + _numel(ours_only)) == counts  # the README quotes these


class _View(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.view(x.shape[0], *self.shape)


class _RefGBlock(nn.Module):
    """gnosis ResBlockGenerator(k, k, stride=2), as written there."""

    def __init__(self, k: int):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear")
        self.model = nn.Sequential(nn.BatchNorm2d(k), nn.ReLU(), self.upsample, nn.Conv2d(k, k, 3, 1, padding=1),
                                   nn.BatchNorm2d(k), nn.ReLU(), nn.Conv2d(k, k, 3, 1, padding=1))

    def forward(self, x):
        return self.model(x) + self.upsample(x)


class _RefDBlock(nn.Module):
    """gnosis FirstResBlockDiscriminator / ResBlockDiscriminator, spectral norm left out (the test feeds them
    the normalised weights of ours)."""

    def __init__(self, cin: int, cout: int, stride: int, first: bool):
        super().__init__()
        layers = [nn.Conv2d(cin, cout, 3, 1, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, padding=1)]
        self.model = nn.Sequential(*([] if first else [nn.ReLU()]), *layers)
        self.downsample = nn.AvgPool2d(2, stride=stride, padding=0) if stride != 1 else nn.Sequential()
        self.bypass = nn.Conv2d(cin, cout, 1, 1, padding=0) if cin != cout else nn.Sequential()

    def forward(self, x):
        return self.downsample(self.model(x)) + self.downsample(self.bypass(x))


def _copy(dst: nn.Module, src: nn.Module) -> None:
    """dst's weight, bias (and BN statistics) := src's; a spectrally normalised src gives its normalised weight."""
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)
        for name in ("running_mean", "running_var"):
            if hasattr(dst, name):
                getattr(dst, name).copy_(getattr(src, name))


def test_gnosis_networks_compute_what_the_authors_modules_compute():
    g, d = build_gan("gnosis-a3")
    k = 256
    ref_g = nn.Sequential(nn.Linear(128, 4 * 4 * k), _View(k, 4, 4), *[_RefGBlock(k) for _ in range(3)],
                          nn.BatchNorm2d(k), nn.ReLU(), nn.Conv2d(k, 3, 3, stride=1, padding=1), nn.Tanh())
    _copy(ref_g[0], g.l1)
    for i, block in enumerate(g.blocks):
        for j, ours in ((0, block.b1), (3, block.c1), (4, block.b2), (6, block.c2)):
            _copy(ref_g[2 + i].model[j], ours)
    _copy(ref_g[5], g.b_out)
    _copy(ref_g[7], g.c_out)
    z = torch.randn(6, 128)
    terms = 8 * 256 * 9  # 8 layers, each summing at most 256 channels x 3 x 3
    with torch.no_grad():
        g.train(), ref_g.train()  # batch statistics, as in training
        assert_close_as(g(z), ref_g(z), torch.float32, terms, msg="train mode")
        g.eval(), ref_g.eval()  # running statistics, as when sampling a pool
        assert_close_as(g(z), ref_g(z), torch.float32, terms, msg="eval mode")

    k = 128
    ref_d = nn.Sequential(_RefDBlock(3, k, 2, True), _RefDBlock(k, k, 2, False), _RefDBlock(k, k, 1, False),
                          _RefDBlock(k, k, 1, False), nn.ReLU(), nn.AvgPool2d(8), _View(k), nn.Linear(k, 1))
    d.eval()  # the normalised weights without another power iteration
    for ref, ours in zip(ref_d[:4], d.blocks):
        convs = [m for m in ref.model if isinstance(m, nn.Conv2d)]
        _copy(convs[0], ours.c1)
        _copy(convs[1], ours.c2)
        if isinstance(ref.bypass, nn.Conv2d):
            _copy(ref.bypass, ours.c_sc)
        else:
            assert ours.c_sc is None  # identity shortcut in both
    _copy(ref_d[7], d.l_out)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert_close_as(d(x), ref_d(x), torch.float32, 6 * 128 * 9, msg="discriminator")  # 6 layers of <= 128 x 3 x 3


def test_initialisation_follows_each_reference():
    """gnosis: Xavier uniform gain 1 (sqrt(2) for 1x1 convs), torch's bias init; miyato: gain sqrt(2) inside the
    residual branches, 1 elsewhere, zero biases."""
    def bound(w: torch.Tensor, gain: float) -> float:
        fan_in, fan_out = w.shape[1] * w[0, 0].numel(), w.shape[0] * w[0, 0].numel()
        return gain * math.sqrt(6.0 / (fan_in + fan_out))

    def near_bound(w: torch.Tensor, gain: float) -> bool:
        b = bound(w, gain)
        return 0.95 * b < w.abs().max().item() <= b

    g, d = build_gan("gnosis-a3")
    c1 = d.blocks[0].c1.parametrizations.weight.original
    sc = d.blocks[0].c_sc.parametrizations.weight.original
    assert near_bound(g.blocks[0].c1.weight, 1.0) and near_bound(c1, 1.0) and near_bound(sc, math.sqrt(2))
    assert near_bound(g.l1.weight, 1.0) and near_bound(g.c_out.weight, 1.0)
    fan_in = g.blocks[0].c1.weight[0].numel()  # torch's default bias: uniform(+-1 / sqrt(fan_in))
    assert 0 < g.blocks[0].c1.bias.abs().max().item() <= 1 / math.sqrt(fan_in)
    g, d = build_gan("miyato")
    assert near_bound(g.blocks[0].c1.weight, math.sqrt(2)) and near_bound(g.blocks[0].c_sc.weight, 1.0)
    assert all(not m.bias.any() for m in _sn_layers(g) + _sn_layers(d) if m.bias is not None)


def test_presets_gnosis_and_miyato():
    p = GAN_PRESETS["gnosis-a3"]  # config/image_generation.yaml (v0.0.7) and density_model/sngan.yaml of the authors
    assert (p.arch, p.z_dim, p.g_ch, p.d_ch, p.image_size, p.channels) == ("gnosis", 128, 256, 128, 32, 3)
    assert (p.g_steps, p.batch_size, p.n_dis, p.lr, p.betas, p.lr_end) == (100_000, 128, 5, 2e-4, (0.0, 0.9), 1e-6)
    assert p.flip and p.g_first and p.ema_decay == 0 and p.snapshots == (10_000, 25_000, 50_000)
    assert (p.upsample, p.same_real) == ("", False) and build_gan(p)[0].upsample == "bilinear"
    # the Figure 1 run: sngan_cifar100_v0.0.5/.hydra/config.yaml (trainer: num_epochs 500, num_disc_updates 5, Adam
    # lr 2e-4 beta1 0.5 beta2 0.999, no lr_decay; dataloader batch_size 64; horizontal_flip) with gan_epoch.py of
    # 2020-12-21 (one G step, then num_disc_updates D steps on the same real batch) and oil's nearest upsampling
    p = GAN_PRESETS["gnosis-fig1"]
    assert (p.arch, p.z_dim, p.g_ch, p.d_ch, p.image_size, p.channels) == ("gnosis", 128, 256, 128, 32, 3)
    assert (p.batch_size, p.n_dis, p.lr, p.betas, p.lr_end) == (64, 5, 2e-4, (0.5, 0.999), 2e-4)
    assert p.g_steps == 500 * math.ceil(50_000 / 64) == 391_000 and p.ema_decay == 0
    assert p.flip and p.g_first and p.same_real and p.upsample == "nearest"
    assert p.snapshots == tuple(e * 782 for e in (100, 200, 300, 400))  # the authors' checkpoint epochs
    g = build_gan(p)[0]
    assert g.upsample == "nearest" and all(b.mode == "nearest" for b in g.blocks)
    assert sum(q.numel() for q in g.parameters()) == 4_079_363  # the same parameters as bilinear
    p = GAN_PRESETS["miyato"]
    assert (p.arch, p.lr_end, p.flip, p.g_first) == ("miyato", 0.0, False, False)
    from kd.synthetic.config import GeneratorTrainConfig as Cfg

    assert Cfg(generator="sngan", dataset="cifar100").preset_name() == "gnosis-a3"  # the sweeps' trained SN-GAN
    fig1 = Cfg(generator="sngan", dataset="cifar100", preset="gnosis-fig1")
    assert fig1.artifact_name() == "generator-cifar100-sngan-gnosis-fig1" and fig1.identity()["same_real"] is True
    with pytest.raises(KDError, match="unknown preset 'gnosis'"):
        Cfg(generator="sngan", dataset="cifar100", preset="gnosis").validate()
    assert Cfg(generator="sngan", dataset="cifar100").artifact_name() == "generator-cifar100-sngan"
    miyato = Cfg(generator="sngan", dataset="cifar10", preset="miyato")
    assert miyato.artifact_name() == "generator-cifar10-sngan-miyato"
    assert Cfg(generator="sngan", dataset="digits").artifact_name() == "generator-digits-sngan"
    assert Cfg(dataset="cifar100").preset_name() == "cifar100"  # the DDPM's presets keep the dataset's name
    assert "snapshots" not in Cfg(generator="sngan", dataset="cifar100").identity()


def _authors_decay(initial: float, final: float, start: int, stop: int):
    """gnosis/utils/optim.py get_decay_fn, the multiplier torch's LambdaLR applies (stepped once per G step)."""
    def decay_fn(counter):
        if counter <= start:
            return 1
        if counter >= stop:
            return final / initial
        return 1 - (counter - start) * (1 - final / initial) / (stop - start)
    return decay_fn


@pytest.mark.parametrize("preset, lr, end", [("gnosis-a3", 2e-4, 1e-6), ("miyato", 2e-4, 0.0),
                                             ("digits", 1e-3, 1e-6)])
def test_learning_rate_decays_linearly_to_the_presets_end(preset, lr, end):
    p = GAN_PRESETS[preset]
    total = p.g_steps
    assert (p.lr, p.lr_end) == (lr, end)
    at = [sngan.lr_at(s, total, p.lr, p.lr_end) for s in (0, total // 2, total, total + 7)]
    assert at[0] == lr and at[1] == pytest.approx((lr + end) / 2, rel=1e-12)
    assert at[2] == at[3] == pytest.approx(end, abs=1e-18)
    decay = _authors_decay(lr, end if end else 1e-30, 0, total)  # sngan_projection's LinearShift ends at 0
    for s in (1, total // 4, total // 3, total - 1):
        assert sngan.lr_at(s, total, p.lr, p.lr_end) == pytest.approx(lr * decay(s), rel=1e-9, abs=1e-15)
    small = 40  # torch's LambdaLR with the authors' function, one scheduler step per G step, as gnosis ran it
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=p.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _authors_decay(lr, end if end else 1e-30, 0, small))
    for s in range(small + 1):
        assert opt.param_groups[0]["lr"] == pytest.approx(sngan.lr_at(s, small, p.lr, p.lr_end), abs=1e-15)
        opt.step()
        sched.step()


def test_fig1_learning_rate_is_constant():
    p = GAN_PRESETS["gnosis-fig1"]
    assert {sngan.lr_at(s, p.g_steps, p.lr, p.lr_end) for s in (0, 1, 12_345, p.g_steps - 1, p.g_steps)} == {2e-4}


def test_upsampling_modes():
    assert [sngan.upsample_mode(a, u) for a, u in (("gnosis", ""), ("miyato", ""), ("gnosis", "nearest"),
                                                   ("miyato", "bilinear"))] == [
        "bilinear", "nearest", "nearest", "bilinear"]
    with pytest.raises(ValueError, match="unknown upsampling 'bicubic'"):
        sngan.Generator(arch="gnosis", upsample="bicubic")
    torch.manual_seed(0)
    small = sngan.GeneratorShape(z_dim=8, ch=8, image_size=8, out_channels=1, bottom=2)
    near = sngan.Generator(small, arch="gnosis", upsample="nearest")
    bil = sngan.Generator(small, arch="gnosis")
    bil.load_state_dict(near.state_dict())  # the same parameters, other images
    z = torch.randn(3, 8)
    assert not torch.allclose(sample(near, z), sample(bil, z))
    x = torch.arange(4.0).view(1, 1, 2, 2)
    assert torch.equal(near.blocks[0]._up(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))


class _Acc:
    """What GanJob.step needs of an Accelerator, on one CPU process."""

    is_main_process = False
    autocast = staticmethod(lambda: __import__("contextlib").nullcontext())
    backward = staticmethod(torch.Tensor.backward)


@pytest.mark.parametrize("same_real", [True, False])
def test_d_steps_take_one_real_batch_or_n_dis(monkeypatch, tmp_path, same_real):
    """gnosis-fig1 (same_real): the 5 D steps of an iteration share one real batch (flipped once), as the Figure 1
    run's gan_epoch.py loops over its loader; else each D step takes its own batch."""
    from dataclasses import replace

    from kd.synthetic.config import GeneratorTrainConfig as Cfg
    from kd.synthetic.train_gan import GanJob

    tiny = replace(GAN_PRESETS["gnosis-fig1" if same_real else "gnosis-a3"], z_dim=8, g_ch=8, d_ch=8, image_size=8,
                   channels=1, bottom=2, batch_size=4)
    monkeypatch.setitem(GAN_PRESETS, "tiny", tiny)
    job = GanJob(Cfg(generator="sngan", dataset="digits", preset="tiny", out=str(tmp_path / "gen")))
    assert job.batches_per_step == (1 if same_real else 5)
    job.build()
    asked, seen = [], []
    monkeypatch.setattr(sngan, "train_step", lambda g, d, og, od, reals, **kw: (seen.append(reals), (0.0, 0.0))[1])

    def batches(k):
        asked.append(k)
        return torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(k)) * 2 - 1

    gen = torch.Generator().manual_seed(0)
    job.step(3, batches, gen, _Acc(), tiny.g_steps)
    (reals,) = seen
    assert len(reals) == 5
    if same_real:
        assert asked == [3] and all(x is reals[0] for x in reals)  # the same (flipped) batch five times
    else:
        assert asked == [15, 16, 17, 18, 19] and not torch.equal(reals[0], reals[1])


def test_authors_order_takes_the_g_step_first():
    p = GAN_PRESETS["digits"]
    g, d = build_gan(p)
    opt_g, opt_d = sngan.optimizers(p, g, d)
    order: list[str] = []
    for name, opt in (("G", opt_g), ("D", opt_d)):
        step = opt.step
        opt.step = lambda *a, _s=step, _n=name, **k: (order.append(_n), _s(*a, **k))[1]
    reals = _digit_batches(2, 16)
    sngan.train_step(g, d, opt_g, opt_d, reals, g_first=True)
    sngan.train_step(g, d, opt_g, opt_d, reals)
    assert order == ["G", "D", "D", "D", "D", "G"]


def test_flips_mirror_about_half_of_the_images():
    from kd.synthetic.train_gan import _flip

    x = torch.arange(200 * 8 * 8, dtype=torch.float32).view(200, 1, 8, 8)
    out = _flip(x, torch.Generator().manual_seed(3))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same ^ mirrored).all()) and 70 < int(mirrored.sum()) < 130
    assert torch.equal(out, _flip(x, torch.Generator().manual_seed(3)))  # drawn from the step's generator only


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
    assert opt_d.defaults["betas"] == (0.0, 0.9) and opt_g.defaults["lr"] == p.lr == 1e-3  # the preset's lr
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
    """The digits SN-GAN trained 40 steps uninterrupted (its command line, in-process); its folder."""
    folder = tmp_path_factory.mktemp("sngan")
    assert run_main("-m kd.synthetic", *GAN_TRAIN, cwd=folder, env={"WANDB_MODE": "disabled"}) == 0
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


def test_the_trainer_logs_the_decaying_learning_rate(trained_gan):
    state = json.loads((trained_gan / "gen/checkpoints/state.json").read_text())
    p = GAN_PRESETS["digits"]
    logged = [r["generator/lr"] for r in state["history"]]  # rows at steps 10..40: the lr of their last G step
    want = [sngan.lr_at(r["step"] - 1, p.g_steps, p.lr, p.lr_end) for r in state["history"]]
    assert logged == pytest.approx(want, rel=1e-12) and logged == sorted(logged, reverse=True)
    assert logged[0] < p.lr and logged[-1] > p.lr_end  # 40 of 300 steps: well on the way down


# ---------------------------------------------------------------- snapshots: pools of one training at several steps

SNAP_TRAIN = ["train", "--generator=sngan", "--dataset=digits", "--save_every=10", "--sample_every=1000",
              "--snapshots=10,20", "--out=gen"]


@pytest.fixture(scope="module")
def gan_with_snapshots(tmp_path_factory) -> Path:
    """The digits SN-GAN trained to step 20 (its export kept as at-20.safetensors), then on to 30, snapshots at
    10 and 20; its folder."""
    folder = tmp_path_factory.mktemp("sngan-snapshots")
    assert run_main("-m kd.synthetic", *SNAP_TRAIN, "--max_steps=20", cwd=folder, env={"WANDB_MODE": "disabled"}) == 0
    shutil.copy(folder / GAN_WEIGHTS, folder / "at-20.safetensors")
    assert run_main("-m kd.synthetic", *SNAP_TRAIN, "--max_steps=30", cwd=folder, env={"WANDB_MODE": "disabled"}) == 0
    return folder


def test_snapshots_are_exported_and_published_with_the_generator(gan_with_snapshots):
    out = gan_with_snapshots / "gen/generator"
    assert sngan.snapshot_steps(out) == [10, 20]
    assert json.loads((out / "generator.json").read_text())["step"] == 30
    snap = json.loads((out / "generator-step00000020.json").read_text())
    assert snap["step"] == 20 and snap["kind"] == "sngan" and snap["sha256"] == sha256_file(
        out / "generator-step00000020.safetensors")
    a, b = load_file(str(out / "generator-step00000020.safetensors")), load_file(
        str(gan_with_snapshots / "at-20.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # G as it was at step 20
    store = gan_with_snapshots / "artifacts/generator-digits-sngan"
    latest = json.loads((store / "latest.json").read_text())["version"]
    manifest = json.loads((store / latest / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["generator-step00000010.json", "generator-step00000010.safetensors",
                                         "generator-step00000020.json", "generator-step00000020.safetensors",
                                         "generator.json", "generator.safetensors"]
    assert manifest["metadata"]["snapshots"] == [10, 20] and manifest["metadata"]["step"] == 30


def test_pool_from_an_intermediate_checkpoint(gan_with_snapshots, workdir, monkeypatch, capsys):
    from kd.report.effect import family_of, step_of

    shutil.copytree(gan_with_snapshots / "artifacts", workdir / "artifacts")
    no_inception_download(monkeypatch, workdir)
    pools = {}
    for step in (10, 20, 0):
        pool = syn.generate(_gan_pool(step=step, num=40, batch_size=40, shard_size=40, fid="auto"))
        pools[step] = syn.load_pool(str(pool))
    images, meta = pools[10]
    assert meta["model"] == "generator-digits-sngan@step10" and meta["generator_step"] == 10
    assert meta["source"] == "generator-digits-sngan-step10" and meta["artifact"] == (
        "synthetic-digits-generator-digits-sngan-step10")
    assert meta["fid"] is None and "Inception weights" in meta["fid_reason"]  # null with the reason, as always
    assert torch.equal(syn.load_pool("synthetic-digits-generator-digits-sngan-step10")[0], images)  # own artifact
    assert pools[20][1]["artifact"] == "synthetic-digits-generator-digits-sngan-step20"
    assert pools[0][1]["model"] == "generator-digits-sngan" and pools[0][1]["generator_step"] == 30
    assert not torch.equal(pools[10][0], pools[20][0]) and not torch.equal(pools[20][0], pools[0][0])
    assert (family_of(meta["model"]), step_of(meta["model"])) == ("generator-digits-sngan", 10)  # the report's
    assert (family_of(pools[0][1]["model"]), step_of(pools[0][1]["model"])) == ("generator-digits-sngan", None)
    # the same step through the trainer's folder, and an FID where the features can be had (a stand-in here)
    folder_pool = syn.generate(_gan_pool(model=str(gan_with_snapshots / "gen"), step=10, num=40, batch_size=40,
                                         shard_size=40, out="from-folder", fid="auto"), quality_feature=TinyFeatures())
    again, meta = syn.load_pool(str(folder_pool))
    assert torch.equal(again, images) and isinstance(meta["fid"], float) and meta["fid"] > 0

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a step that was never exported: one line naming what there is
        syn.main(["generate", "--model=generator-digits-sngan", "--dataset=digits", "--num=4", "--step=15"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "no SN-GAN generator at step 15" in err
    assert "snapshots: 10, 20; final: step 30" in err and "--snapshots=15" in err
    with pytest.raises(KDError, match="not an SN-GAN generator: drop --step"):
        syn.generate(_gan_pool(model="google/ddpm-cifar10-32", step=5))


def test_snapshot_settings_and_snapshots_of_another_run(tmp_path):
    from kd.synthetic.config import GeneratorTrainConfig as Cfg
    from kd.synthetic.train_gan import GanJob

    assert Cfg(generator="sngan", dataset="cifar100").snapshot_steps() == (10_000, 25_000, 50_000)
    assert Cfg(generator="sngan", dataset="digits", snapshots="200,50").snapshot_steps() == (50, 200)
    assert Cfg(generator="sngan", dataset="digits", snapshots="none").snapshot_steps() == ()
    with pytest.raises(KDError, match="must name steps from 1 to the run's 300 G steps"):
        Cfg(generator="sngan", dataset="digits", snapshots="400").validate()
    with pytest.raises(KDError, match="--snapshots does not apply to --generator=ddpm"):
        Cfg(dataset="digits", snapshots="10").validate()
    cfg = Cfg(generator="sngan", dataset="digits", out=str(tmp_path / "gen"))
    job = GanJob(cfg)
    folder = tmp_path / "gen/generator"
    g = sngan.generator_of(job.recipe)
    sngan.save_generator(folder, g, job.recipe, {"step": 100, "identity": job.identity}, sngan.snapshot_stem(100))
    sngan.save_generator(folder, g, job.recipe, {"step": 200, "identity": {**job.identity, "seed": 1}},
                         sngan.snapshot_stem(200))
    job._drop_foreign_snapshots()  # what training does before its first step: another run's snapshot goes
    assert sngan.snapshot_steps(folder) == [100] and not (folder / "generator-step00000200.safetensors").exists()


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


@pytest.mark.slow  # several seconds to half a minute: make chaos runs it
def test_sngan_pool_feeds_distill(gan_store, teachers_dir):
    pool = syn.generate(_gan_pool(out="pool", num=144, batch_size=64, shard_size=144))  # ratio 0.1 of 1437
    out = run_script("distill.py", *TINY, "--epochs=1", "--teachers=teacher-digits-preresnet8-s0",
                     "--synthetic_ratio=0.1", f"--synthetic_pool={pool}", cwd=gan_store,
                     env={"KD_STORE": str(teachers_dir / "artifacts")})
    assert "student test acc" in out.stdout
    (config,) = gan_store.glob("runs/student-digits-preresnet8-n1-t0-r0.1-*/config.json")
    config = json.loads(config.read_text())
    assert config["n_synthetic"] == 144 and config["synthetic_pool_sha256"] == sha256_file(pool)
    assert config["synthetic_source"] == "generator-digits-sngan"
