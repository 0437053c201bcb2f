"""Recipes for the generators that ``python -m kd.synthetic train`` fits: DDPMs and the paper's SN-GAN.

DDPM (:class:`Preset`, ``--generator=ddpm``):

* ``digits``: a tiny UNet at 8 px, one channel, trained on the CPU in about a minute; the offline demo uses
  it, so it stays small and fast rather than good.
* ``cifar10`` / ``cifar100``: the shape of google/ddpm-cifar10-32 (Ho et al. 2020: 35.7M parameters, dropout
  0.1, linear betas, lr 2e-4 with 5000 warmup steps, batch 128, EMA 0.9999, about 800k steps): a GPU job.

SN-GAN (:class:`GanPreset`, ``--generator=sngan``; Miyato et al. 2018, the generator Stanton et al. 2021 used):

* ``cifar10`` / ``cifar100``: ResNet G (z 128, 256 channels, 4 -> 32 px) and D (128 channels), hinge loss,
  Adam lr 2e-4 betas (0, 0.9), batch 64, n_dis 5, 50k generator steps.
* ``digits``: 8 px greyscale, 32 channels, n_dis 2, 300 generator steps: seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    unet: dict  # UNet2DModel keyword arguments
    noise: dict  # DDPMScheduler keyword arguments (the training noise schedule)
    epochs: int
    batch_size: int
    lr: float
    warmup: int  # linear warmup steps, then cosine decay to 0 over the run
    ema_decay: float
    ema_power: float  # EMA warmup: decay = 1 - (1 + step) ** -power, capped at ema_decay
    flip: bool  # random horizontal flips of the training images
    save_every: int  # optimizer steps between checkpoints
    sample_every: int  # optimizer steps between sample grids
    sample_steps: int = 50  # DDIM steps for those grids


_DDPM_CIFAR_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, dropout=0.1,
)

_CIFAR = Preset(
    unet=_DDPM_CIFAR_UNET,
    noise=dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
               clip_sample=True, variance_type="fixed_large"),
    epochs=2048, batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999, ema_power=0.75, flip=True,
    save_every=5000, sample_every=20000,
)

PRESETS: dict[str, Preset] = {
    "digits": Preset(
        unet=dict(
            sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        ),
        noise=dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        epochs=80, batch_size=128, lr=2e-3, warmup=100, ema_decay=0.999, ema_power=0.75, flip=False,
        save_every=250, sample_every=500,
    ),
    "cifar10": _CIFAR,
    "cifar100": _CIFAR,
}


@dataclass(frozen=True)
class GanPreset:
    """One SN-GAN recipe. ``channels`` is the image channels; ``ema_decay`` 0 means no EMA copy of G."""

    z_dim: int
    g_ch: int
    d_ch: int
    image_size: int
    channels: int
    bottom: int
    batch_size: int = 64
    n_dis: int = 5  # D steps per G step
    lr: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.9)
    g_steps: int = 50_000
    ema_decay: float = 0.0
    d_down: int = 2  # D's down-sampling blocks, the optimized first one included
    d_plain: int = 2  # D's blocks that keep the resolution
    save_every: int = 1000  # generator steps between checkpoints
    sample_every: int = 5000  # generator steps between sample grids


_CIFAR_GAN = GanPreset(z_dim=128, g_ch=256, d_ch=128, image_size=32, channels=3, bottom=4)

GAN_PRESETS: dict[str, GanPreset] = {
    "cifar10": _CIFAR_GAN,  # the paper's settings (Miyato et al. 2018, Table 4 / Sec. 4)
    "cifar100": _CIFAR_GAN,
    # 8 px greyscale digits, 2 up blocks from 2x2: seconds on a CPU, for tests and the offline demo
    "digits": GanPreset(z_dim=32, g_ch=32, d_ch=32, image_size=8, channels=1, bottom=2, batch_size=64, n_dis=2,
                        g_steps=300, save_every=100, sample_every=300),
}

GENERATORS = ("ddpm", "sngan")


def presets_of(generator: str) -> dict:
    """The recipes of one generator kind: ``PRESETS`` (ddpm) or ``GAN_PRESETS`` (sngan)."""
    return GAN_PRESETS if generator == "sngan" else PRESETS
