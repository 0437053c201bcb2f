"""The paper's generator: an unconditional SN-GAN (Miyato et al. 2018, "Spectral Normalization for GANs").

Stanton et al. (2021) drew their synthetic distillation images from the ResNet SN-GAN that Miyato et al. describe
for 32x32 CIFAR (their Table 4 / Appendix B.4; FID about 74 on CIFAR-100):

* G: z ~ N(0, I) in R^128 -> linear -> 256 x 4 x 4 -> three up-sampling residual blocks -> BN, ReLU, conv3x3 -> 3,
  tanh. No spectral norm in G; batch norm instead.
* D: an "optimized" down-sampling first block, one more down-sampling block, two plain blocks (all 128 channels),
  ReLU, global sum pooling, linear -> 1. Spectral norm on every conv and linear layer.
* Hinge loss, Adam lr 2e-4, betas (0.0, 0.9), batch 64, n_dis = 5 D steps per G step, 50k G steps.

Weights start as in the authors' Chainer code (pfnet-research/sngan_projection) and its PyTorch port in Mimicry
(kwotsin/mimicry, ``torch_mimicry.nets.sngan``): Xavier uniform with gain sqrt(2) for the 3x3 convs inside residual
branches, gain 1 for the 1x1 shortcut convs and for the first/last layers (G's linear and output conv, D's linear);
biases zero (Chainer's default). Spectral norm is torch's own ``torch.nn.utils.parametrizations.spectral_norm``:
the learnable tensor is ``parametrizations.weight.original``; the power-iteration vectors ``_u``/``_v`` are buffers.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from kd.errors import KDError
from kd.io import GENERATOR, load_tensors, plain_file_name, read_json, save_tensors, write_json
from kd.synthetic.presets import GAN_PRESETS, GanPreset

_RES_GAIN = math.sqrt(2.0)


def _init(layer: nn.Conv2d | nn.Linear, gain: float) -> nn.Conv2d | nn.Linear:
    """Xavier-uniform weight with ``gain``, zero bias (sngan_projection / Mimicry)."""
    nn.init.xavier_uniform_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _conv(cin: int, cout: int, k: int, gain: float, sn: bool = False) -> nn.Module:
    """A k x k conv (padding k // 2, with bias), initialised, then spectrally normalised when ``sn``."""
    conv = _init(nn.Conv2d(cin, cout, k, padding=k // 2), gain)
    return spectral_norm(conv) if sn else conv


def _n_doublings(size: int, bottom: int) -> int:
    """log2(size / bottom), insisting that it is a whole number >= 1."""
    n = round(math.log2(size / bottom)) if size > 0 and bottom > 0 else -1
    if n < 1 or bottom * 2**n != size:
        raise ValueError(f"image_size {size} must be bottom {bottom} times a power of two (>= 2)")
    return n


class GBlock(nn.Module):
    """G's up-sampling residual block: BN, ReLU, nearest x2, conv3x3, BN, ReLU, conv3x3; shortcut x2 + conv1x1."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.b1, self.b2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.c1, self.c2 = _conv(cin, cout, 3, _RES_GAIN), _conv(cout, cout, 3, _RES_GAIN)
        self.c_sc = _conv(cin, cout, 1, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.b1(x)), scale_factor=2, mode="nearest")
        h = self.c2(F.relu(self.b2(self.c1(h))))
        return h + self.c_sc(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    """D's residual block: ReLU, conv3x3, ReLU, conv3x3 [, avgpool2]; shortcut conv1x1 [+ avgpool2] when it
    changes shape, else identity. ``optimized`` (D's first block, on raw pixels) drops the leading ReLU and puts
    the pool before the shortcut conv, as in the paper's code."""

    def __init__(self, cin: int, cout: int, down: bool, optimized: bool = False):
        super().__init__()
        self.down, self.optimized = down or optimized, optimized
        self.c1, self.c2 = _conv(cin, cout, 3, _RES_GAIN, sn=True), _conv(cout, cout, 3, _RES_GAIN, sn=True)
        self.c_sc = _conv(cin, cout, 1, 1.0, sn=True) if (cin != cout or self.down) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(F.relu(self.c1(x if self.optimized else F.relu(x))))
        if self.down:
            h = F.avg_pool2d(h, 2)
        sc = x
        if self.optimized:
            sc = self.c_sc(F.avg_pool2d(x, 2))
        elif self.c_sc is not None:
            sc = self.c_sc(x)
            sc = F.avg_pool2d(sc, 2) if self.down else sc
        return h + sc


class Generator(nn.Module):
    """SN-GAN ResNet generator (no spectral norm): z -> linear -> ch x bottom x bottom -> log2(image_size / bottom)
    up blocks -> BN, ReLU, conv3x3 -> out_channels -> tanh. CIFAR: z 128, ch 256, bottom 4, 3 blocks."""

    def __init__(self, z_dim: int = 128, ch: int = 256, image_size: int = 32, out_channels: int = 3, bottom: int = 4):
        super().__init__()
        self.z_dim, self.ch, self.bottom, self.image_size = z_dim, ch, bottom, image_size
        n_up = _n_doublings(image_size, bottom)
        self.l1 = _init(nn.Linear(z_dim, ch * bottom * bottom), 1.0)
        self.blocks = nn.Sequential(*[GBlock(ch, ch) for _ in range(n_up)])
        self.b_out = nn.BatchNorm2d(ch)
        self.c_out = _conv(ch, out_channels, 3, 1.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.l1(z).view(z.shape[0], self.ch, self.bottom, self.bottom)
        return torch.tanh(self.c_out(F.relu(self.b_out(self.blocks(h)))))


class Discriminator(nn.Module):
    """SN-GAN ResNet discriminator for CIFAR: optimized down block, ``n_down - 1`` more down blocks, ``n_plain``
    plain blocks, ReLU, global sum pooling, linear -> 1 logit per image ([B, 1]). Every conv and the linear are
    spectrally normalised. The paper's CIFAR D is n_down=2, n_plain=2 (32 -> 16 -> 8 px), ch 128."""

    def __init__(self, ch: int = 128, in_channels: int = 3, n_down: int = 2, n_plain: int = 2):
        super().__init__()
        if n_down < 1 or n_plain < 0:
            raise ValueError(f"need n_down >= 1 and n_plain >= 0, got {n_down} and {n_plain}")
        blocks = [DBlock(in_channels, ch, down=True, optimized=True)]
        blocks += [DBlock(ch, ch, down=True) for _ in range(n_down - 1)]
        blocks += [DBlock(ch, ch, down=False) for _ in range(n_plain)]
        self.blocks = nn.Sequential(*blocks)
        self.l_out = spectral_norm(_init(nn.Linear(ch, 1), 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))
        return self.l_out(h)


def d_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D's hinge loss (the paper's choice): mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def g_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """G's hinge loss: -mean(D(G(z)))."""
    return -fake_logits.mean()


def build_gan(preset: GanPreset | str) -> tuple[Generator, Discriminator]:
    """(G, D) for a preset (or its name in ``GAN_PRESETS``)."""
    if isinstance(preset, str):
        if preset not in GAN_PRESETS:
            raise ValueError(f"unknown GAN preset {preset!r}: choose one of {', '.join(sorted(GAN_PRESETS))}")
        preset = GAN_PRESETS[preset]
    g = Generator(preset.z_dim, preset.g_ch, preset.image_size, preset.channels, preset.bottom)
    d = Discriminator(preset.d_ch, preset.channels, preset.d_down, preset.d_plain)
    return g, d


def optimizers(preset: GanPreset, g: nn.Module, d: nn.Module) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G and for D with the preset's lr and betas (paper: 2e-4, (0.0, 0.9))."""
    return (torch.optim.Adam(g.parameters(), lr=preset.lr, betas=preset.betas),
            torch.optim.Adam(d.parameters(), lr=preset.lr, betas=preset.betas))


def train_step(g: Generator, d: Discriminator, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
               reals: list[torch.Tensor], *, generator: torch.Generator | None = None, z_dim: int | None = None,
               backward=None) -> tuple[float, float]:
    """One generator iteration: a D step per real batch in ``reals`` (n_dis of them, float images in [-1, 1]),
    then one G step on a fresh batch of the same size. Returns (last D loss, G loss).

    ``generator`` draws the latents (a resumed run replays them exactly); ``z_dim`` and ``backward``
    (e.g. ``accelerator.backward``) serve models wrapped for distributed training."""
    if not reals:
        raise ValueError("train_step needs at least one real batch")
    z_dim, backward = z_dim or g.z_dim, backward or torch.Tensor.backward
    g.train()
    d.train()
    for x in reals:
        z = torch.randn(x.shape[0], z_dim, device=x.device, generator=generator)
        with torch.no_grad():
            fake = g(z)
        d_loss = d_hinge_loss(d(x), d(fake))
        opt_d.zero_grad(set_to_none=True)
        backward(d_loss)
        opt_d.step()
    z = torch.randn(reals[-1].shape[0], z_dim, device=reals[-1].device, generator=generator)
    g_loss = g_hinge_loss(d(g(z)))
    opt_g.zero_grad(set_to_none=True)
    backward(g_loss)
    opt_g.step()
    return d_loss.item(), g_loss.item()


@torch.no_grad()
def ema_update(ema: nn.Module, g: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * g on parameters; BN running statistics are copied."""
    for pe, p in zip(ema.parameters(), g.parameters()):
        pe.lerp_(p, 1.0 - decay)
    for be, b in zip(ema.buffers(), g.buffers()):
        be.copy_(b)


@torch.no_grad()
def sample(g: Generator, z: torch.Tensor) -> torch.Tensor:
    """G(z) in eval mode (BN running statistics, as the paper's code samples), float in [-1, 1]; G's mode is
    restored afterwards."""
    was_training = g.training
    g.eval()
    try:
        return g(z).clamp(-1.0, 1.0)
    finally:
        g.train(was_training)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255] (round to nearest)."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


# ---------------------------------------------------------------- the exported generator: safetensors + JSON

GENERATOR_JSON, GENERATOR_WEIGHTS = "generator.json", "generator.safetensors"


def save_generator(folder: Path, g: Generator, preset: GanPreset, meta: dict) -> list[Path]:
    """``folder/generator.safetensors`` (G's weights and BN statistics) and ``folder/generator.json`` (kind
    "sngan", the preset, the weights' sha256, ``meta``): what ``generate --model=...`` loads. No pickle."""
    digest = save_tensors(folder / GENERATOR_WEIGHTS, dict(g.state_dict()))
    write_json(folder / GENERATOR_JSON, {**meta, "kind": "sngan", "preset": asdict(preset),
                                         "file": GENERATOR_WEIGHTS, "sha256": digest})
    return [folder / GENERATOR_WEIGHTS, folder / GENERATOR_JSON]


def is_generator_folder(folder: Path) -> bool:
    """A folder :func:`save_generator` wrote (its generator.json names the kind "sngan")."""
    path = Path(folder) / GENERATOR_JSON
    return path.exists() and read_json(path, GENERATOR).get("kind") == "sngan"


def load_generator(folder: Path, device: str = "cpu") -> tuple[Generator, dict]:
    """The generator of a :func:`save_generator` folder (sha256-verified), in eval mode, and its JSON."""
    info = read_json(Path(folder) / GENERATOR_JSON, GENERATOR)
    try:
        p = dict(info["preset"])
        preset = GanPreset(**{**p, "betas": tuple(p.get("betas", (0.0, 0.9)))})
        g = Generator(preset.z_dim, preset.g_ch, preset.image_size, preset.channels, preset.bottom)
        weights = plain_file_name(info["file"], Path(folder) / GENERATOR_JSON)  # beside it, never a path out
        g.load_state_dict(load_tensors(Path(folder) / weights, info["sha256"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise KDError(f"{folder} is not a loadable SN-GAN generator folder ({why}): train one with "
                      "`python -m kd.synthetic train --generator=sngan --dataset=...`") from None
    return g.to(device).eval(), info
