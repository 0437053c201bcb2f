"""Recipes for the generators that ``python -m kd.synthetic train`` fits: DDPMs and the paper's SN-GAN.

DDPM (:class:`Preset`, ``--generator=ddpm``):

* ``digits``: a tiny UNet at 8 px, one channel, trained on the CPU in about a minute; the offline demo uses
  it, so it stays small and fast rather than good.
* ``cifar10`` / ``cifar100``: the shape of google/ddpm-cifar10-32 (Ho et al. 2020: 35.7M parameters, dropout
  0.1, linear betas, lr 2e-4 with 5000 warmup steps, batch 128, EMA 0.9999, about 800k steps): a GPU job.

SN-GAN (:class:`GanPreset`, ``--generator=sngan``). Both gnosis presets build Stanton et al. 2021's networks
(samuelstanton/gnosis with olive-oil-ml's ResNet GAN): G z 128 -> linear 4x4x256 -> three residual up blocks
(x2 upsampling, BN-ReLU-conv3x3 twice, identity shortcut) -> BN, ReLU, conv3x3, tanh; D 128 channels, spectral
norm on every layer, ReLU, global average pooling, linear -> 1; hinge loss; each iteration one G step then 5 D
steps; horizontal flips; images in [-1, 1]; unconditional. They differ in the recipe:

* ``gnosis-fig1``: the run whose generator made the paper's Figure 1 (``sngan_cifar100_v0.0.5``, started
  2020-12-22; its ``.hydra/config.yaml`` and ``gnosis/boilerplate/gan_epoch.py``, ``scripts/image_generation.py``
  of that day): nearest x2 upsampling; 500 epochs at batch 64 (782 iterations an epoch, the last one short: 391k
  G steps in all, counted here as 391,000 whole batches); each iteration's 5 D steps all see the SAME real batch
  (``same_real``), each with fresh fakes; Adam 2e-4 betas (0.5, 0.999), constant (no decay). Snapshots at the
  G steps of the authors' checkpoints of epochs 100 to 400 (the final one is epoch 500).
  ``python -m kd.synthetic import`` brings the authors' own weights of that run instead of retraining.
* ``gnosis-a3`` (the default on CIFAR): the recipe of the paper's App. A.3, the authors' later code (config
  v0.0.7 on, from 2020-12-24): bilinear x2 upsampling; batch 128; 5 fresh real batches per iteration; Adam 2e-4
  betas (0, 0.9) decayed linearly to 1e-6 over 100k G steps. Snapshots of G at 10k, 25k and 50k steps (the final
  one is 100k). It did not make Figure 1's generator.
* ``miyato``: the SN-GAN paper's CIFAR recipe (Miyato et al. 2018; pfnet-research/sngan_projection): G with
  nearest x2 upsampling and 1x1-conv shortcuts, D ending in global sum pooling, hinge loss, batch 64, n_dis 5,
  Adam 2e-4 betas (0, 0.9) decayed linearly to 0 over 50k G steps, no flips. Snapshots at 10k and 25k.
  (sngan_projection's code also draws 128 fakes per G step, takes the G step first, has no bias in D's last
  linear and adds dequantisation noise to the real images; this preset keeps the paper's text on those.)
* ``digits``: the gnosis-a3 recipe at 8 px greyscale (2 up blocks from 2x2, 32 channels, n_dis 2, batch 64, no
  flips: digits are not mirror-symmetric), lr 1e-3 decayed to 1e-6 (at 2e-4 these small nets collapse to a few
  modes within 300 steps), 300 G steps with snapshots at 100 and 200: under a minute on a CPU.
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
    """One SN-GAN recipe. ``channels`` is the image channels; ``ema_decay`` 0 means no EMA copy of G.

    ``arch`` picks the blocks (:mod:`kd.generators.sngan`): "miyato" (nearest upsampling, 1x1-conv shortcuts
    where a block resamples, D sum-pooled, the paper's initialisation) or "gnosis" (bilinear upsampling,
    identity shortcuts where the channels match, D average-pooled, olive-oil-ml's initialisation). The learning
    rate goes linearly from ``lr`` at G step 0 to ``lr_end`` at ``g_steps`` (G and D alike; ``lr_end == lr``:
    constant). ``g_first``: each iteration is one G step, then ``n_dis`` D steps (the authors' order), else the D
    steps come first. ``same_real``: the ``n_dis`` D steps of an iteration all take the same real batch (the
    Figure 1 run's code), else each its own. ``upsample``: G's x2 upsampling, "nearest" or "bilinear" (empty:
    the arch's own, miyato nearest and gnosis bilinear).
    ``snapshots``: the G steps at which the trainer also exports G (``generate --step``); like ``save_every``
    they do not change the weights, so they are not part of a run's identity."""

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
    arch: str = "miyato"
    lr_end: float = 0.0  # the learning rate at the last G step (linear decay from lr)
    g_first: bool = False
    flip: bool = False  # random horizontal flips of the real images
    snapshots: tuple[int, ...] = ()
    upsample: str = ""  # G's x2 upsampling: nearest | bilinear; empty: the arch's own
    same_real: bool = False  # the n_dis D steps of an iteration share one real batch


ARCHS = ("miyato", "gnosis")
UPSAMPLING = ("", "nearest", "bilinear")
FIG1_EPOCH_STEPS = 782  # iterations (G steps) per epoch of the Figure 1 run: ceil(50,000 / 64)

GAN_PRESETS: dict[str, GanPreset] = {
    # Miyato et al. 2018, Table 4 / Sec. 4, with sngan_projection's linear decay to 0
    "miyato": GanPreset(z_dim=128, g_ch=256, d_ch=128, image_size=32, channels=3, bottom=4,
                        snapshots=(10_000, 25_000)),
    # the run behind Figure 1: gnosis sngan_cifar100_v0.0.5/.hydra/config.yaml (2020-12-22), oil resnetgan
    "gnosis-fig1": GanPreset(z_dim=128, g_ch=256, d_ch=128, image_size=32, channels=3, bottom=4, batch_size=64,
                             n_dis=5, lr=2e-4, betas=(0.5, 0.999), g_steps=500 * FIG1_EPOCH_STEPS, lr_end=2e-4,
                             arch="gnosis", upsample="nearest", g_first=True, flip=True, same_real=True,
                             sample_every=10 * FIG1_EPOCH_STEPS,
                             snapshots=tuple(e * FIG1_EPOCH_STEPS for e in (100, 200, 300, 400))),
    # the paper's App. A.3: the authors' later code (config v0.0.7 on), image_generation.yaml + sngan.yaml
    "gnosis-a3": GanPreset(z_dim=128, g_ch=256, d_ch=128, image_size=32, channels=3, bottom=4, batch_size=128,
                           n_dis=5, lr=2e-4, betas=(0.0, 0.9), g_steps=100_000, lr_end=1e-6, arch="gnosis",
                           g_first=True, flip=True, snapshots=(10_000, 25_000, 50_000)),
    # 8 px greyscale digits, 2 up blocks from 2x2: seconds on a CPU, for tests and the offline demos
    "digits": GanPreset(z_dim=32, g_ch=32, d_ch=32, image_size=8, channels=1, bottom=2, batch_size=64, n_dis=2,
                        lr=1e-3, g_steps=300, save_every=100, sample_every=300, arch="gnosis", lr_end=1e-6,
                        g_first=True, snapshots=(100, 200)),
}
DEFAULT_GAN_PRESET = {"digits": "digits", "cifar10": "gnosis-a3", "cifar100": "gnosis-a3"}  # --preset left empty

GENERATORS = ("ddpm", "sngan")


def presets_of(generator: str) -> dict:
    """The recipes of one generator kind: ``PRESETS`` (ddpm) or ``GAN_PRESETS`` (sngan)."""
    return GAN_PRESETS if generator == "sngan" else PRESETS


def default_preset(generator: str, dataset: str) -> str:
    """The recipe ``--preset`` names when left empty: the dataset's name (DDPM), gnosis-a3 on CIFAR (SN-GAN)."""
    return DEFAULT_GAN_PRESET.get(dataset, dataset) if generator == "sngan" else dataset
