"""The settings of ``python -m kd.synthetic generate`` and ``train``: dataclasses whose fields declare their
meaning, allowed values and default once (:func:`kd.flags.setting`), so ``--help`` and validation agree.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

from kd import names
from kd.datasets import DATASETS, dataset_spec
from kd.errors import KDError, check_name
from kd.flags import check_fields, fingerprint, identity, setting
from kd.generators.presets import GanPreset, Preset
from kd.synthetic.families import FAMILIES, family

SCHEDULERS = ("ddpm", "ddim", "dpm")
_SEED_MAX = 2**63 - 1
STEP_MARK = names.STEP_MARK


@dataclass
class GenerateConfig:
    """python -m kd.synthetic generate: sample a pool of synthetic images (sharded, resumable, bit-identical)."""

    model: str = setting("", "hub id, pipeline folder or generator artifact (DDPM or SN-GAN); empty: the "
                             "dataset's default")
    dataset: str = setting("cifar10", "the dataset the pool is for (its image size)", choices=DATASETS)
    num: int = setting(50000, "images in the pool", lo=1, hi=100_000_000)
    scheduler: str = setting("ddim", "diffusion sampler (an SN-GAN ignores it)", choices=SCHEDULERS)
    steps: str = setting("auto", "sampler steps: a positive integer, or auto (ddpm: all training timesteps, "
                                 "ddim 100, dpm 25)")
    step: int = setting(0, "SN-GAN: sample G as it was at this training step (a snapshot the trainer exported, "
                           "see train --snapshots; the pool's name gets -stepN); 0: the final G", lo=0)
    seed: int = setting(0, "pool seed: image i depends on (seed, i) only", lo=0, hi=_SEED_MAX)
    batch_size: int = setting(256, "images per forward batch", lo=1, hi=65_536)
    shard_size: int = setting(1024, "images per shard file (the unit of resumption)", lo=1, hi=1_000_000)
    fid: str = setting("auto", "FID/IS against the training images after the pool is made; auto: skip with one "
                               "line where the Inception weights cannot be had", choices=("auto", "True", "False"),
                       identity=False)
    data_dir: str = setting("data", "folder of the CIFAR archives (the real images FID compares with)",
                            identity=False)
    out: str = setting("", "output folder; empty: runs/synthetic/{dataset}-{source}", identity=False)
    store: str = setting("", "local artifact store; empty: $KD_STORE, else ./artifacts", identity=False)
    source: str = setting("", "names the pool; empty: a sanitised model name", name=True, identity=False)
    project: str = setting(names.PROJECT, "W&B project", name=True, identity=False)
    device: str = setting("auto", "auto (cuda if present) | cpu | cuda | cuda:N", identity=False)
    threads: int = setting(0, "CPU threads for torch; 0: torch's default (1 is faster on a busy machine)", lo=0,
                          hi=1024, identity=False)
    resume: str = setting("auto", "auto: a finished pool is finished, an unfinished one goes on from its shards | "
                                  "False: make it again (valid shards are reused)", choices=("auto", "True", "False"),
                          identity=False)

    kind = "synthetic-data"
    # what the run lifecycle (kd.session) reads that a pool does not set: one process, resumed by its shards
    study: ClassVar[str] = "default"
    mixed_precision: ClassVar[str] = "no"
    out_flag: ClassVar[str] = "--out (the pool's folder)"

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def run_seed(self) -> int:
        return self.seed % 2**32  # the global seeds (the pool's images depend on (seed, i) only)

    def run_name(self) -> str:
        return self.artifact_name()

    def run_dir(self) -> Path:
        return self.out_dir()

    def identity(self) -> dict:
        return identity(self)

    def validate(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise KDError(f"unknown scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        check_fields(self)
        if self.steps != "auto":
            try:
                steps = int(self.steps)
            except ValueError:
                raise KDError(f"--steps expects a positive integer or auto, got {self.steps!r}") from None
            if steps <= 0:
                raise KDError(f"--steps must be >= 1, got {steps}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise KDError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def model_ref(self) -> str:
        return self.model or dataset_spec(self.dataset).generator_model()

    def source_name(self) -> str:
        return self.source or source_name(self.model_ref()) + (f"-step{self.step}" if self.step else "")

    def model_label(self) -> str:
        """What the pool records as its model (and distillation as the run's synthetic source): the model, with
        ``@stepN`` for a snapshot, so pools of one training at several steps are told apart."""
        return self.model_ref() + (f"{STEP_MARK}{self.step}" if self.step else "")

    def artifact_name(self) -> str:
        return check_name(names.pool_artifact(self.dataset, self.source_name()), "artifact name")

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/synthetic/{self.dataset}-{self.source_name()}")


_NOT_IN_IDENTITY = ("save_every", "sample_every", "snapshots")  # when and what is saved, not the weights
_OVERRIDES = ("batch_size", "lr", "save_every", "sample_every", "epochs", "g_steps", "n_dis")  # 0: the preset's


@dataclass
class GeneratorTrainConfig:
    """python -m kd.synthetic train: fit a generator (DDPM or the paper's SN-GAN) on a dataset's training split."""

    generator: str = setting("ddpm", "the generator family (kd.synthetic.families): ddpm, a diffusion model | "
                                     "sngan, the paper's SN-GAN", choices=FAMILIES)
    dataset: str = setting("digits", "training data", choices=DATASETS)
    preset: str = setting("", "recipe: ddpm digits | cifar10 | cifar100, sngan gnosis-a3 | gnosis-fig1 | miyato | "
                              "digits; empty: the dataset's name (ddpm), gnosis-a3 on CIFAR (sngan)")
    epochs: int = setting(0, "DDPM: passes over the data; 0: the preset's", lo=0, hi=1_000_000)
    g_steps: int = setting(0, "SN-GAN: generator steps in all; 0: the preset's (gnosis-a3 100k, gnosis-fig1 391k, "
                                 "miyato 50k)", lo=0)
    n_dis: int = setting(0, "SN-GAN: D steps per G step; 0: the preset's (5 on CIFAR)", lo=0, hi=100)
    batch_size: int = setting(0, "images per step; 0: the preset's", lo=0, hi=65_536)
    lr: float = setting(0.0, "peak learning rate; 0: the preset's", lo=0, hi=10)
    ema_decay: float = setting(-1.0, "EMA of the weights that are sampled (SN-GAN: 0 = none); -1: the preset's",
                               lo=-1, hi=1, hi_open=True)
    save_every: int = setting(0, "steps between checkpoints; 0: the preset's", lo=0)
    sample_every: int = setting(0, "steps between sample grids; 0: the preset's", lo=0)
    snapshots: str = setting("", "SN-GAN: G steps at which G is also exported, for generate --step (e.g. "
                                 "10000,25000,50000); empty: the preset's; none: no snapshots")
    max_steps: int = setting(0, "> 0: stop (with a checkpoint) after this many steps; rerun to go on", lo=0)
    seed: int = setting(0, "seed of weights, data order and noise", lo=0, hi=2**32 - 1)
    mixed_precision: str = setting("auto", "auto: bf16 for a DDPM on a GPU, else no",
                                   choices=("auto", "no", "bf16", "fp16"))
    cpu: bool = setting(False, "force the CPU even where a GPU exists", choices=(True, False))
    data_dir: str = setting("data", "folder of the CIFAR archives (downloaded there when missing)")
    out: str = setting("", "output folder; empty: runs/{artifact name} (checkpoints, samples, the export)")
    store: str = setting("", "local artifact store; empty: $KD_STORE, else ./artifacts")
    project: str = setting(names.PROJECT, "W&B project", name=True)
    resume: str = setting("auto", "auto: continue a matching checkpoint | True: one must exist | False: restart",
                          choices=("auto", "True", "False"))
    threads: int = setting(0, "CPU threads for torch; 0: torch's default (1 is faster on a busy machine)", lo=0,
                          hi=1024)

    kind = "generator"

    def validate(self) -> None:
        check_fields(self)
        presets = family(self.generator).presets()
        if self.preset_name() not in presets:
            raise KDError(f"unknown preset {self.preset!r}: choose one of {', '.join(sorted(presets))}")
        mine = set(family(self.generator).settings)
        for other in FAMILIES.values():
            for key in set(other.settings) - mine:
                if getattr(self, key):
                    raise KDError(f"--{key} does not apply to --generator={self.generator} (the {other.name} "
                                  "setting): drop it")
        if self.generator == "sngan":
            self.snapshot_steps()

    def preset_name(self) -> str:
        return self.preset or self.default_preset()

    def default_preset(self) -> str:
        """The recipe of an empty ``--preset`` (a dataset variant such as digits-hard takes its family's)."""
        return family(self.generator).default_preset(dataset_spec(self.dataset).recipes)

    def snapshot_steps(self) -> tuple[int, ...]:
        """The G steps at which the SN-GAN trainer exports snapshots: ``--snapshots``, else the preset's."""
        if self.generator != "sngan" or self.snapshots.strip().lower() == "none":
            return ()
        total = self.recipe().g_steps
        if not self.snapshots.strip():
            return tuple(s for s in self.recipe().snapshots if s <= total)
        try:
            steps = sorted({int(x) for x in self.snapshots.split(",") if x.strip()})
        except ValueError:
            raise KDError(f"--snapshots expects G steps separated by commas (e.g. 10000,25000) or none, got "
                          f"{self.snapshots!r}") from None
        if not steps or steps[0] < 1 or steps[-1] > total:
            raise KDError(f"--snapshots={self.snapshots} must name steps from 1 to the run's {total} G steps "
                          f"(--g_steps), or be none")
        return tuple(steps)

    def recipe(self) -> Preset | GanPreset:
        """The preset with the non-zero overrides of the command line."""
        preset = family(self.generator).presets()[self.preset_name()]
        known = {f.name for f in fields(preset)}
        over = {k: getattr(self, k) for k in _OVERRIDES if k in known and getattr(self, k)}
        if self.ema_decay >= 0:
            over["ema_decay"] = self.ema_decay
        return replace(preset, **over)

    def artifact_name(self) -> str:
        """``generator-{dataset}`` (DDPM), ``generator-{dataset}-sngan`` (the dataset's default SN-GAN preset), with
        ``-{preset}`` appended for any other preset (e.g. ``generator-cifar100-sngan-miyato``)."""
        name = names.generator_artifact(self.dataset, self.generator)
        preset = self.preset_name()
        return name if preset == self.default_preset() else f"{name}-{preset}"

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/{self.artifact_name()}")

    # what the run lifecycle (kd.session) reads
    study: ClassVar[str] = "default"
    out_flag: ClassVar[str] = "--out (the generator's run folder)"

    @property
    def run_seed(self) -> int:
        return self.seed

    def run_name(self) -> str:
        return self.artifact_name()

    def run_dir(self) -> Path:
        return self.out_dir()

    def fingerprint(self) -> str:
        return fingerprint(self.identity())

    def identity(self) -> dict:
        """What the weights depend on (a checkpoint made under another identity is not resumed)."""
        recipe = {k: v for k, v in asdict(self.recipe()).items() if k not in _NOT_IN_IDENTITY}
        return {"generator": self.generator, "dataset": self.dataset, "preset": self.preset_name(),
                "seed": self.seed, **recipe}


def source_name(model: str) -> str:
    """``google/ddpm-cifar10-32`` -> ``ddpm-cifar10-32``; ``runs/generator-digits/pipeline`` ->
    ``generator-digits``; an artifact name stays as it is."""
    path = Path(model).expanduser()
    if path.exists():
        path = path.resolve()
        name = path.parent.name if path.name in ("pipeline", "generator") else path.name
    else:
        name = model.rstrip("/").rsplit("/", 1)[-1]
    clean = re.sub(r"\.\.+", ".", re.sub(r"[^A-Za-z0-9_.-]+", "-", name)).strip("-.")[:100]
    return check_name(clean or "model", "source")
