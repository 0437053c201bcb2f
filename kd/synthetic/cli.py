"""The command line of the synthetic-data stage: ``python -m kd.synthetic train|generate|import`` (see __main__)."""

from __future__ import annotations

import sys

from kd.errors import KDError, cli
from kd.flags import parse_flags
from kd.synthetic.config import GenerateConfig, GeneratorTrainConfig

USAGE = """usage: python -m kd.synthetic generate --dataset=D [--model=M] [--num=N] [--scheduler=ddpm|ddim|dpm]
                                    [--step=N (an SN-GAN snapshot)] ...
       python -m kd.synthetic train --dataset=D [--generator=ddpm|sngan] [--preset=P] [--snapshots=S,...] ...
       python -m kd.synthetic import [--dataset=cifar100|cifar10] [--epoch=100..500] [--upsample=nearest|bilinear]
                                  [--file=PATH] [--source=gnosis|oil]   (the authors' SN-GAN weights)
       python -m kd.synthetic generate --help   (all settings and their defaults; likewise train, import)"""


def main(argv: list[str] | None = None) -> None:
    from kd.synthetic.gnosis import ImportConfig, import_generator
    from kd.synthetic.pool import generate
    from kd.synthetic.trainer import train

    argv = list(sys.argv[1:] if argv is None else argv)
    with cli():
        if not argv or argv[0] in ("-h", "--help"):
            print(USAGE)
            return
        command, rest = argv[0], argv[1:]
        if command == "generate":
            generate(parse_flags(GenerateConfig, rest))
        elif command == "train":
            train(parse_flags(GeneratorTrainConfig, rest))
        elif command == "import":
            import_generator(parse_flags(ImportConfig, rest))
        else:
            raise KDError(f"unknown command {command!r}: use generate, train or import (python -m kd.synthetic "
                          "--help)")
