"""Synthetic images for distillation: generators (a DDPM, or the paper's SN-GAN) and pools sampled from them.

    python -m kd.synthetic generate --model=google/ddpm-cifar10-32 --dataset=cifar10 --num=50000 \\
        --scheduler=ddim --steps=100                       # -> runs/synthetic/cifar10-ddpm-cifar10-32/
    python -m kd.synthetic train --dataset=digits          # a small DDPM of your own -> generator-digits
    python -m kd.synthetic import --dataset=cifar100       # the authors' own Figure 1 SN-GAN weights (epoch 500)
    python -m kd.synthetic generate --model=generator-cifar100-gnosis-e500 --dataset=cifar100 --num=50000
    python -m kd.synthetic train --generator=sngan --dataset=cifar100     # an SN-GAN (preset gnosis-a3; GPU)
    python -m kd.synthetic generate --model=generator-cifar100-sngan --dataset=cifar100 --num=50000
    python -m kd.synthetic generate --model=generator-cifar100-sngan --dataset=cifar100 --num=50000 --step=10000

In a notebook, ``load_generator("generator-cifar100-gnosis-e500")`` is the generator as a torch module (latents
[N, 128] -> images in [-1, 1], eval mode).

Modules: :mod:`.config` (the settings), :mod:`.families` (the generator families a run trains: recipes, jobs),
:mod:`.pool` (``generate``), :mod:`.quality` (FID / IS), :mod:`.trainer` (the one training skeleton) with its
jobs :mod:`.train_ddpm` and :mod:`.train_gan`, :mod:`.gnosis` (``import``: the authors' checkpoints, verified)
with :mod:`.oil` (their file format, read without running code), :mod:`.cli` (the command line; ``python -m
kd.synthetic`` runs it). The generators' models, recipes and samplers, which students sample too, are
:mod:`kd.generators`; reading a pool is :mod:`kd.pools`.
"""

from kd.generators import load_generator
from kd.generators.sampling import (
    denoise,
    derived_seed,
    load_pipeline,
    model_fingerprint,
    save_grid,
    scheduler_class,
    to_pixels,
)
from kd.pools import POOL_FILE, load_pool
from kd.synthetic.cli import USAGE, main
from kd.synthetic.config import GenerateConfig, GeneratorTrainConfig, source_name
from kd.synthetic.gnosis import ImportConfig, import_generator
from kd.synthetic.pool import generate
from kd.synthetic.trainer import train

__all__ = ["USAGE", "POOL_FILE", "GenerateConfig", "GeneratorTrainConfig", "ImportConfig", "denoise", "derived_seed",
           "generate", "import_generator", "load_generator", "load_pipeline", "load_pool", "main",
           "model_fingerprint", "save_grid", "scheduler_class", "source_name", "to_pixels", "train"]
