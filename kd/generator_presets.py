"""Recipes for the unconditional DDPMs that ``python -m kd.synthetic train`` fits.

* ``digits``: a tiny UNet at 8 px, one channel, trained on the CPU in about a minute; the offline demo uses
  it, so it stays small and fast rather than good.
* ``cifar10`` / ``cifar100``: the shape of google/ddpm-cifar10-32 (Ho et al. 2020: 35.7M parameters, dropout
  0.1, linear betas, lr 2e-4 with 5000 warmup steps, batch 128, EMA 0.9999, about 800k steps): a GPU job.
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
