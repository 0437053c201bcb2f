"""The SN-GAN (Miyato et al. 2018, "Spectral Normalization for GANs") in the two variants the presets name.

Both are unconditional ResNet GANs for 32x32 images (z ~ N(0, I) in R^128 -> linear -> 256 x 4 x 4 -> three
up-sampling residual blocks -> BN, ReLU, conv3x3 -> 3 channels, tanh; no spectral norm in G, batch norm instead;
D: a first down-sampling block on raw pixels, one more down-sampling block, two plain blocks, 128 channels, ReLU,
global pooling, linear -> 1, spectral norm on every conv and linear layer; hinge loss). They differ in:

* ``arch="gnosis"``: the generator Stanton et al. 2021 trained (samuelstanton/gnosis ``gnosis/models/sngan.py``,
  copied from olive-oil-ml's ``resnetgan.py``): bilinear x2 upsampling (``upsample="nearest"``: the nearest
  neighbour, as olive-oil-ml's G had it until 2020-12-23 and as the authors' Figure 1 generator was trained; the
  parameters are the same either way, so :mod:`kd.synthetic.gnosis` loads their weights into it); a block's
  shortcut is the identity where its channels match (every G block, D's second block, which is then
  average-pooled), a 1x1 conv only where they do not (D's first block); D pools globally by the average;
  Xavier-uniform weights with gain 1 (gain sqrt(2) for 1x1 convs), torch's default bias initialisation. G
  4,079,363 and D 1,037,313 parameters at 32 px.
* ``arch="miyato"``: the SN-GAN paper's CIFAR networks as its Chainer code (pfnet-research/sngan_projection)
  and Mimicry's port build them: nearest x2 upsampling; 1x1-conv shortcuts in every block that resamples or
  changes channels; D pools globally by the sum; Xavier-uniform with gain sqrt(2) for the 3x3 convs inside
  residual branches and gain 1 elsewhere, zero biases. G 4,276,739 and D 1,053,825 parameters (D's last linear
  has a bias here, as in Mimicry; sngan_projection's has none).

Spectral norm is torch's own ``torch.nn.utils.parametrizations.spectral_norm`` (one power iteration per
training forward, as the old ``torch.nn.utils.spectral_norm`` the authors used; it starts from 15 iterations
when a layer is wrapped where the old hook starts from a random vector): the learnable tensor is
``parametrizations.weight.original``; the power-iteration vectors ``_u``/``_v`` are buffers.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from kd.errors import KDError
from kd.generators.presets import ARCHS, GAN_PRESETS, UPSAMPLING, GanPreset
from kd.io import GENERATOR, load_tensors, plain_file_name, read_json, save_tensors, write_json

_RES_GAIN = math.sqrt(2.0)


def _init(layer: nn.Conv2d | nn.Linear, gain: float, zero_bias: bool = True) -> nn.Conv2d | nn.Linear:
    """Xavier-uniform weight with ``gain``; the bias zeroed (sngan_projection / Mimicry) or, with
    ``zero_bias=False``, left as torch initialised it (olive-oil-ml / gnosis)."""
    nn.init.xavier_uniform_(layer.weight, gain)
    if layer.bias is not None and zero_bias:
        nn.init.zeros_(layer.bias)
    return layer


def _conv(cin: int, cout: int, k: int, gain: float, sn: bool = False, zero_bias: bool = True) -> nn.Module:
    """A k x k conv (padding k // 2, with bias), initialised, then spectrally normalised when ``sn``."""
    conv = _init(nn.Conv2d(cin, cout, k, padding=k // 2), gain, zero_bias)
    return spectral_norm(conv) if sn else conv


def _check_arch(arch: str) -> bool:
    """True for "gnosis", False for "miyato"; anything else is a ValueError."""
    if arch not in ARCHS:
        raise ValueError(f"unknown SN-GAN arch {arch!r}: choose one of {', '.join(ARCHS)}")
    return arch == "gnosis"


def upsample_mode(arch: str, upsample: str = "") -> str:
    """G's x2 upsampling: ``upsample`` ("nearest" or "bilinear"), or, left empty, the arch's own (gnosis
    bilinear, miyato nearest)."""
    gnosis = _check_arch(arch)
    if upsample not in UPSAMPLING:
        raise ValueError(f"unknown upsampling {upsample!r}: choose one of {', '.join(UPSAMPLING[1:])}")
    return upsample or ("bilinear" if gnosis else "nearest")


def _n_doublings(size: int, bottom: int) -> int:
    """log2(size / bottom), insisting that it is a whole number >= 1."""
    n = round(math.log2(size / bottom)) if size > 0 and bottom > 0 else -1
    if n < 1 or bottom * 2**n != size:
        raise ValueError(f"image_size {size} must be bottom {bottom} times a power of two (>= 2)")
    return n


class GBlock(nn.Module):
    """G's up-sampling residual block: BN, ReLU, x2 up, conv3x3, BN, ReLU, conv3x3, plus the shortcut: x2 up,
    then a 1x1 conv (miyato: always; gnosis: only where the channels change). miyato upsamples by nearest
    neighbour, gnosis bilinearly (``nn.Upsample(scale_factor=2, mode="bilinear")``, corners not aligned), unless
    ``upsample`` names the mode (:func:`upsample_mode`)."""

    def __init__(self, cin: int, cout: int, arch: str = "miyato", upsample: str = ""):
        super().__init__()
        gnosis = _check_arch(arch)
        self.mode = upsample_mode(arch, upsample)
        gain = 1.0 if gnosis else _RES_GAIN
        self.b1, self.b2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.c1 = _conv(cin, cout, 3, gain, zero_bias=not gnosis)
        self.c2 = _conv(cout, cout, 3, gain, zero_bias=not gnosis)
        learnable = cin != cout or not gnosis
        self.c_sc = _conv(cin, cout, 1, _RES_GAIN if gnosis else 1.0, zero_bias=not gnosis) if learnable else None

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bilinear":
            return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return F.interpolate(x, scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._up(F.relu(self.b1(x)))
        h = self.c2(F.relu(self.b2(self.c1(h))))
        sc = self._up(x)
        return h + (self.c_sc(sc) if self.c_sc is not None else sc)


class DBlock(nn.Module):
    """D's residual block: ReLU, conv3x3, ReLU, conv3x3 [, avgpool2], plus the shortcut [avgpool2 of] the input or
    a 1x1 conv of it. ``optimized`` (D's first block, on raw pixels) drops the leading ReLU.

    miyato: a 1x1-conv shortcut wherever the block down-samples or changes channels (the optimized block pools
    before that conv, as the paper's code does); gnosis: a 1x1 conv only where the channels change, the
    identity (average-pooled when down-sampling) elsewhere."""

    def __init__(self, cin: int, cout: int, down: bool, optimized: bool = False, arch: str = "miyato"):
        super().__init__()
        gnosis = _check_arch(arch)
        self.down, self.optimized = down or optimized, optimized
        gain = 1.0 if gnosis else _RES_GAIN
        self.c1 = _conv(cin, cout, 3, gain, sn=True, zero_bias=not gnosis)
        self.c2 = _conv(cout, cout, 3, gain, sn=True, zero_bias=not gnosis)
        learnable = cin != cout or (self.down and not gnosis)
        sc_gain = _RES_GAIN if gnosis else 1.0
        self.c_sc = _conv(cin, cout, 1, sc_gain, sn=True, zero_bias=not gnosis) if learnable else None
        self.pool_first = optimized and not gnosis  # pool then 1x1 conv: the same map as conv then pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(F.relu(self.c1(x if self.optimized else F.relu(x))))
        if self.down:
            h = F.avg_pool2d(h, 2)
        if self.pool_first:
            return h + self.c_sc(F.avg_pool2d(x, 2))
        sc = self.c_sc(x) if self.c_sc is not None else x
        return h + (F.avg_pool2d(sc, 2) if self.down else sc)


@dataclass(frozen=True)
class GeneratorShape:
    """A generator's sizes: latent z_dim, channels ch, output image_size and out_channels, the bottom x bottom grid
    the up blocks start from. The default is CIFAR's."""

    z_dim: int = 128
    ch: int = 256
    image_size: int = 32
    out_channels: int = 3
    bottom: int = 4


class Generator(nn.Module):
    """SN-GAN ResNet generator (no spectral norm): z -> linear -> ch x bottom x bottom -> log2(image_size / bottom)
    up blocks -> BN, ReLU, conv3x3 -> out_channels -> tanh. CIFAR: z 128, ch 256, bottom 4, 3 blocks.
    ``upsample``: the blocks' x2 upsampling, "nearest" or "bilinear" (empty: the arch's own)."""

    def __init__(self, shape: GeneratorShape = GeneratorShape(), arch: str = "miyato", upsample: str = ""):
        super().__init__()
        z_dim, ch, image_size, out_channels, bottom = (shape.z_dim, shape.ch, shape.image_size, shape.out_channels,
                                                       shape.bottom)
        zero_bias = not _check_arch(arch)
        self.z_dim, self.ch, self.bottom, self.image_size, self.arch = z_dim, ch, bottom, image_size, arch
        self.upsample = upsample_mode(arch, upsample)
        n_up = _n_doublings(image_size, bottom)
        self.l1 = _init(nn.Linear(z_dim, ch * bottom * bottom), 1.0, zero_bias)
        self.blocks = nn.Sequential(*[GBlock(ch, ch, arch, self.upsample) for _ in range(n_up)])
        self.b_out = nn.BatchNorm2d(ch)
        self.c_out = _conv(ch, out_channels, 3, 1.0, zero_bias=zero_bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.l1(z).view(z.shape[0], self.ch, self.bottom, self.bottom)
        return torch.tanh(self.c_out(F.relu(self.b_out(self.blocks(h)))))


class Discriminator(nn.Module):
    """SN-GAN ResNet discriminator for CIFAR: optimized down block, ``n_down - 1`` more down blocks, ``n_plain``
    plain blocks, ReLU, global pooling (miyato: the sum; gnosis: the average, ``nn.AvgPool2d(8)`` at 32 px),
    linear -> 1 logit per image ([B, 1]). Every conv and the linear are spectrally normalised. The CIFAR D of
    both is n_down=2, n_plain=2 (32 -> 16 -> 8 px), ch 128."""

    def __init__(self, ch: int = 128, in_channels: int = 3, n_down: int = 2, n_plain: int = 2, arch: str = "miyato"):
        super().__init__()
        gnosis = _check_arch(arch)
        if n_down < 1 or n_plain < 0:
            raise ValueError(f"need n_down >= 1 and n_plain >= 0, got {n_down} and {n_plain}")
        blocks = [DBlock(in_channels, ch, down=True, optimized=True, arch=arch)]
        blocks += [DBlock(ch, ch, down=True, arch=arch) for _ in range(n_down - 1)]
        blocks += [DBlock(ch, ch, down=False, arch=arch) for _ in range(n_plain)]
        self.blocks = nn.Sequential(*blocks)
        self.average = gnosis
        self.l_out = spectral_norm(_init(nn.Linear(ch, 1), 1.0, zero_bias=not gnosis))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.blocks(x))
        h = h.mean(dim=(2, 3)) if self.average else h.sum(dim=(2, 3))
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
    return generator_of(preset), Discriminator(preset.d_ch, preset.channels, preset.d_down, preset.d_plain,
                                               preset.arch)


def generator_of(preset: GanPreset) -> Generator:
    """A freshly initialised G of ``preset``'s shape."""
    shape = GeneratorShape(preset.z_dim, preset.g_ch, preset.image_size, preset.channels, preset.bottom)
    return Generator(shape, preset.arch, preset.upsample)


def lr_at(step: int, total: int, lr: float, lr_end: float) -> float:
    """The learning rate of G step ``step`` (0-based) of ``total``: linear from ``lr`` at step 0 to ``lr_end`` at
    step ``total`` (and after). As sngan_projection's ``LinearShift`` (lr_end 0) and gnosis's ``get_decay_fn``
    under ``LambdaLR``, stepped once per G step (lr_end 1e-6). ``lr_end == lr``: ``lr`` throughout."""
    if lr_end == lr:
        return lr
    frac = min(max(step, 0), total) / total if total > 0 else 1.0
    return lr * (1.0 - frac) + lr_end * frac


def set_lr(lr: float, *optimizers: torch.optim.Optimizer) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


def optimizers(preset: GanPreset, g: nn.Module, d: nn.Module) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G and for D with the preset's lr and betas (paper: 2e-4, (0.0, 0.9))."""
    return (torch.optim.Adam(g.parameters(), lr=preset.lr, betas=preset.betas),
            torch.optim.Adam(d.parameters(), lr=preset.lr, betas=preset.betas))


def train_step(g: Generator, d: Discriminator, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
               reals: list[torch.Tensor], *, generator: torch.Generator | None = None, z_dim: int | None = None,
               backward=None, g_first: bool = False) -> tuple[float, float]:
    """One generator iteration: a D step per real batch in ``reals`` (n_dis of them, float images in [-1, 1])
    and one G step on a fresh batch of the same size, the G step last (Miyato et al.'s Algorithm 1) or, with
    ``g_first``, first (the authors' code and sngan_projection's). Returns (last D loss, G loss).

    ``generator`` draws the latents (a resumed run replays them exactly); ``z_dim`` and ``backward``
    (e.g. ``accelerator.backward``) serve models wrapped for distributed training."""
    if not reals:
        raise ValueError("train_step needs at least one real batch")
    z_dim, backward = z_dim or g.z_dim, backward or torch.Tensor.backward
    g.train()
    d.train()

    def g_step(x: torch.Tensor) -> torch.Tensor:
        z = torch.randn(x.shape[0], z_dim, device=x.device, generator=generator)
        loss = g_hinge_loss(d(g(z)))
        opt_g.zero_grad(set_to_none=True)
        backward(loss)
        opt_g.step()
        return loss

    g_loss = g_step(reals[0]) if g_first else None
    for x in reals:
        z = torch.randn(x.shape[0], z_dim, device=x.device, generator=generator)
        with torch.no_grad():
            fake = g(z)
        d_loss = d_hinge_loss(d(x), d(fake))
        opt_d.zero_grad(set_to_none=True)
        backward(d_loss)
        opt_d.step()
    if g_loss is None:
        g_loss = g_step(reals[-1])
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
_SNAPSHOT = re.compile(r"^generator-step(\d{8})\.json$")


def snapshot_stem(step: int) -> str:
    """The file stem of G exported at ``step`` beside the final G: ``generator-step00010000``."""
    return f"generator-step{step:08d}"


def save_generator(folder: Path, g: Generator, preset: GanPreset, meta: dict, stem: str = "generator") -> list[Path]:
    """``folder/{stem}.safetensors`` (G's weights and BN statistics) and ``folder/{stem}.json`` (kind "sngan", the
    preset, the weights' sha256, ``meta``): what ``generate --model=...`` loads. No pickle. The final G is
    ``generator``, a snapshot at step s :func:`snapshot_stem` (s)."""
    weights, info = Path(folder) / f"{stem}.safetensors", Path(folder) / f"{stem}.json"
    digest = save_tensors(weights, dict(g.state_dict()))
    write_json(info, {**meta, "kind": "sngan", "preset": asdict(preset), "file": weights.name, "sha256": digest})
    return [weights, info]


def is_generator_folder(folder: Path) -> bool:
    """A folder :func:`save_generator` wrote (its generator.json names the kind "sngan")."""
    path = Path(folder) / GENERATOR_JSON
    return path.exists() and read_json(path, GENERATOR).get("kind") == "sngan"


def snapshot_steps(folder: Path) -> list[int]:
    """The steps of the snapshots in a :func:`save_generator` folder, ascending."""
    return sorted(int(m.group(1)) for p in Path(folder).glob("generator-step*.json") if (m := _SNAPSHOT.match(p.name)))


def generator_json(folder: Path, step: int = 0) -> Path:
    """The JSON of G at ``step`` in a :func:`save_generator` folder (0: the final G): the snapshot of that step,
    else the final G when it was exported at that step; a KDError naming the steps there are otherwise."""
    folder, final = Path(folder), Path(folder) / GENERATOR_JSON
    if not step:
        return final
    snap = folder / f"{snapshot_stem(step)}.json"
    if snap.is_file():
        return snap
    last = read_json(final, GENERATOR).get("step") if final.is_file() else None
    if last == step:
        return final
    have = ", ".join(map(str, snapshot_steps(folder))) or "none"
    raise KDError(f"{folder} holds no SN-GAN generator at step {step} (snapshots: {have}; final: step "
                  f"{last if last is not None else '?'}): pass one of those to --step, or train with "
                  f"--snapshots={step} (a snapshot is written when the run passes its step)")


def load_generator(folder: Path, device: str = "cpu", step: int = 0) -> tuple[Generator, dict]:
    """G of a :func:`save_generator` folder at ``step`` (0: the final G; see :func:`generator_json`),
    sha256-verified, in eval mode, and its JSON."""
    path = generator_json(folder, step)
    info = read_json(path, GENERATOR)
    try:
        p = dict(info["preset"])
        preset = GanPreset(**{**p, "betas": tuple(p.get("betas", (0.0, 0.9))),
                              "snapshots": tuple(p.get("snapshots", ()))})
        g = generator_of(preset)
        weights = plain_file_name(info["file"], path)  # beside its JSON, never a path out
        g.load_state_dict(load_tensors(Path(folder) / weights, info["sha256"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise KDError(f"{path} is not a loadable SN-GAN generator ({why}): train one with "
                      "`python -m kd.synthetic train --generator=sngan --dataset=...`") from None
    return g.to(device).eval(), info
