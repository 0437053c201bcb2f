"""The experiment, declared once: the settings of a teacher and of a student run, and the student grid's axes.

The command line *is* the W&B config: every field here is logged, and a W&B sweep passes its parameters back
as ``--key=value``. Each field declares its meaning, range, default, and whether it belongs to the run's
identity (:func:`kd.flags.setting`); the choices of ``--dataset``, ``--loss`` and ``--optimizer`` are the
registries below this module (:mod:`kd.datasets`, :mod:`kd.losses`, :mod:`kd.optim`).

:data:`STUDENT_AXES` is the student grid: the axes along which a study's student runs differ. The run name, the
report's grid points, groups, table and CSV columns, and the packs of a grid all derive from it and from the
fields' declarations; adding an axis is one field plus one entry there (plus its use in the training code).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from kd import names
from kd.datasets import DATASETS
from kd.errors import KDError, check_name
from kd.flags import SEED_MAX, check_fields, fingerprint, identity, setting
from kd.losses import LOSSES
from kd.names import check_arch
from kd.optim import OPTIMIZERS, SCHEDULES

SYNTHETIC_MODES = ("static", "online")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# What an "auto" setting becomes: (on CUDA, elsewhere). On CUDA: bf16 autocast over float32 master weights, the
# static-shape step compiled with CUDA graphs, a test-set evaluation every 5 epochs (and the last), a checkpoint
# every 600 s (and at the last epoch and every stop); elsewhere the float32 eager loop, evaluating and
# checkpointing every epoch. --mixed_precision=fp32 keeps the authors' float32 arithmetic on any device.
AUTO = {"mixed_precision": "auto", "compile": "auto", "compile_mode": "auto", "eval_every": 0,
        "checkpoint_every_s": -1.0}
DEVICE_DEFAULTS = {"mixed_precision": ("bf16", "no"), "compile": ("True", "False"),
                   "compile_mode": ("reduce-overhead", "default"), "eval_every": (5, 1),
                   "checkpoint_every_s": (600.0, 0.0)}
# Seeds: a teacher's is its --seed, below STUDENT_SEEDS; a student's default is STUDENT_SEEDS + its trial, so no
# student starts from a teacher's initial weights or replays a teacher's data order and augmentation draws (the
# authors drew a random seed per run). An explicit --seed of a student still wins.
STUDENT_SEEDS = 1_000_000


def on_cuda(cfg) -> bool:
    """Whether ``cfg`` runs on a CUDA device on this machine."""
    import torch

    return torch.cuda.is_available() and not cfg.cpu


def precision(value: str, cuda: bool) -> str:
    """Accelerate's mixed_precision for ``value``: auto resolved, fp32 as Accelerate's "no"."""
    value = DEVICE_DEFAULTS["mixed_precision"][0 if cuda else 1] if value == "auto" else value
    return "no" if value == "fp32" else value


def resolve_device_defaults(cfg, cuda: bool | None = None):
    """``cfg`` with its ``auto`` settings (:data:`AUTO`) resolved for CUDA (``cuda``) or not; None: this machine."""
    if not isinstance(cfg, TrainConfig):
        return cfg  # the generators' configs resolve their own
    cuda = on_cuda(cfg) if cuda is None else cuda
    changes = {k: DEVICE_DEFAULTS[k][0 if cuda else 1] for k, auto in AUTO.items() if getattr(cfg, k) == auto}
    changes["mixed_precision"] = precision(cfg.mixed_precision, cuda)
    return dataclasses.replace(cfg, **changes)


@dataclass
class TrainConfig:
    """Teacher training; defaults are the paper's teacher recipe (App. A.3)."""

    dataset: str = setting("cifar10", "training data", choices=DATASETS)
    arch: str = setting("preresnet56", "network: preresnet{depth} (the authors' PreResNet) or timm:{name}")
    seed: int = setting(0, "seed of weights and data order (teacher i of an ensemble uses seed i; students' seeds "
                           f"start at {STUDENT_SEEDS})", lo=0, hi=STUDENT_SEEDS - 1, packs=True)
    epochs: int = setting(200, "passes over the real training data", lo=1, hi=10_000)
    batch_size: int = setting(256, "images per optimizer step (all processes together)", lo=1, hi=65_536)
    optimizer: str = setting("sgd", "optimizer (kd.optim.OPTIMIZERS)", choices=OPTIMIZERS, identity="non_default")
    lr: float = setting(0.1, "peak learning rate", lo=0, hi=10, lo_open=True)
    schedule: str = setting("cosine", "learning-rate schedule, stepped once per epoch (kd.optim.SCHEDULES)",
                            choices=SCHEDULES, identity="non_default")
    eta_min: float = setting(0.0, "learning rate after the last epoch (<= lr)", lo=0, hi=10)
    momentum: float = setting(0.9, "SGD momentum", lo=0, hi=1, hi_open=True)
    nesterov: bool = setting(False, "Nesterov momentum", choices=(True, False))
    weight_decay: float = setting(1e-4, "L2 weight decay on every parameter", lo=0, hi=1, hi_open=True)
    mixed_precision: str = setting("auto", "autocast through Accelerate over float32 weights; auto: bf16 on CUDA, "
                                   "fp32 elsewhere; fp32 (or no): none, the authors' arithmetic",
                                   choices=("auto", "fp32", "no", "bf16", "fp16"),
                                   resolve=lambda cfg: precision(cfg.mixed_precision, on_cuda(cfg)))
    channels_last: bool = setting(True, "NHWC memory format (faster convolutions on GPUs)", choices=(True, False))
    sync_bn: bool = setting(True, "several processes: BatchNorm statistics over the whole batch of every process "
                                  "(the numbers of one process; kd.syncbn); False: each process's own part",
                            choices=(True, False), identity="non_default")
    compile: str = setting("auto", "torch.compile the static-shape step; auto: on CUDA only",
                           choices=("auto", "True", "False"), identity=False)
    compile_mode: str = setting("auto", "torch.compile mode of the compiled step; auto: reduce-overhead (CUDA "
                                "graphs) on CUDA, torch.compile's default elsewhere", choices=COMPILE_MODES,
                                identity=False)
    cpu: bool = setting(False, "force the CPU even where a GPU exists", choices=(True, False), identity=False,
                        packs=False)
    eval_every: int = setting(0, "epochs between test-set evaluations (the last epoch always); 0: auto, 5 on "
                              "CUDA, 1 elsewhere", lo=0, hi=10_000, identity=False)
    checkpoint_every_s: float = setting(-1.0, "seconds between checkpoints at epoch ends (the last epoch and a "
                                        "stop always); 0: every epoch; -1: auto, 600 on CUDA, 0 elsewhere", lo=-1,
                                        hi=1e7, identity=False)
    data_dir: str = setting("data", "folder of the CIFAR archives (downloaded there when missing)",
                            identity=False, packs=False)
    out_dir: str = setting("runs", "folder of run folders (checkpoints, final weights)", identity=False)
    store: str = setting("", "local artifact store; empty: $KD_STORE, else ./artifacts", identity=False)
    project: str = setting(names.PROJECT, "W&B project", name=True, identity=False)
    study: str = setting("default", "label grouping the runs of one reproduction (the report reads it)",
                         name=True, packs=True)
    resume: str = setting("auto", "auto: continue a matching checkpoint | True: one must exist | False: restart",
                          choices=("auto", "True", "False"), identity=False)

    kind = names.TEACHER
    out_flag: ClassVar[str] = "--out_dir"

    def validate(self) -> None:
        check_fields(self)
        check_arch(self.arch)
        if self.eta_min > self.lr:
            raise KDError(f"--eta_min ({self.eta_min}) must not exceed --lr ({self.lr})")

    @property
    def run_seed(self) -> int:
        return self.seed

    def run_name(self) -> str:
        return names.teacher_artifact(self.dataset, self.arch, self.seed)

    def identity(self) -> dict:
        """The fields that define what is computed (not where it is written or how it is resumed)."""
        return identity(self)

    def fingerprint(self) -> str:
        return fingerprint(self.identity())

    def run_dir(self) -> Path:
        """``{out_dir}/{run name}-{fingerprint}``: the one folder of this run (the same config, the same folder)."""
        return Path(self.out_dir) / f"{self.run_name()}-{self.fingerprint()}"


@dataclass
class DistillConfig(TrainConfig):
    """Student distillation; defaults are the paper's student recipe (App. A.3, Eq. 1)."""

    seed: int = setting(-1, f"student seed; -1: {STUDENT_SEEDS} + the trial (a space of its own: never a teacher's "
                            "seed)", lo=-1, hi=SEED_MAX, packs=True)
    epochs: int = setting(300, "passes over the real training data", lo=1, hi=10_000)
    batch_size: int = setting(128, "images per optimizer step, real + synthetic", lo=1, hi=65_536)
    lr: float = setting(0.05, "peak learning rate", lo=0, hi=10, lo_open=True)
    eta_min: float = setting(1e-6, "learning rate after the last epoch (<= lr)", lo=0, hi=10)
    nesterov: bool = setting(True, "Nesterov momentum", choices=(True, False))
    loss: str = setting("kd", "distillation loss (kd.losses.LOSSES)", choices=LOSSES, identity="non_default",
                        packs=True)
    alpha: float = setting(0.0, "--loss=kd_nll: weight of the label term (the paper's 0 is Eq. 1 alone)", lo=0,
                           hi=1, identity="non_default", packs=True)
    teachers: str = setting("", "comma-separated teacher artifact names; empty: --ensemble_size/--trial", packs=True)
    teacher_arch: str = setting("", "arch of the teachers --ensemble_size chooses; empty: --arch", packs=True)
    ensemble_size: int = setting(1, "teachers in the ensemble (a block of the study's teachers)", lo=1, hi=1000,
                                 packs=True)
    teacher_pool: int = setting(0, "the study's teachers are seeds 0..N-1 (N = this); 0: every teacher holding the "
                                "study's alias", lo=0, hi=10_000, packs=True)
    trial: int = setting(0, "trial number: picks the teacher block (t*m mod N) and the default seed", lo=0,
                         hi=1_000_000, packs=True)
    temperature: float = setting(1.0, "distillation temperature tau of Eq. 1", lo=0.01, hi=100, packs=True)
    synthetic_ratio: float = setting(0.0, "synthetic images per real image added (0.25 = +12.5k on CIFAR)",
                                     lo=0, hi=100)
    synthetic_pool: str = setting("", "a pool (file or synthetic-* artifact): the run takes its trial's block of it "
                                      "(a pool per trial's worth of images); or --synthetic_generator",
                                  identity=lambda cfg: cfg.synthetic_ratio > 0)  # real data only: any pool
    synthetic_generator: str = setting("", "a generator (artifact or folder; NAME@stepN: an SN-GAN snapshot): the run "
                                           "samples its own images from it, by its seed (the paper's way); or "
                                           "--synthetic_pool", identity=lambda cfg: cfg.synthetic_ratio > 0)
    synthetic_mode: str = setting("static", "static: the run's draw of round(r * n_real) images, made once (Figure "
                                  "1) | online: fresh --synthetic_generator samples in every step, int(B * r / (1 + "
                                  "r)) of each batch", choices=SYNTHETIC_MODES, identity="non_default")
    synthetic_generator_bn: str = setting("train", "--synthetic_mode=online: the SN-GAN's BatchNorm while sampling: "
                                                   "train (batch statistics, the authors' online code) or eval "
                                                   "(running statistics)", choices=("train", "eval"),
                                          identity=lambda cfg: cfg.synthetic_mode == "online")
    synthetic_temperature: float = setting(0.0, "--synthetic_mode=online: tau of the synthetic rows; 0: --temperature",
                                           lo=0, hi=100, identity=lambda cfg: cfg.synthetic_mode == "online")
    teacher_cache: bool = setting(True, "reuse teacher outputs over the enumerable views (exact)",
                                  choices=(True, False), identity=False)
    cache_dtype: str = setting("float32", "storage of cached teacher log-probs",
                               choices=("float32", "float16", "bfloat16"), identity=False)

    kind = names.STUDENT

    def validate(self) -> None:
        super().validate()
        if self.teacher_arch:
            check_arch(self.teacher_arch)
        listed = [t.strip() for t in self.teachers.split(",")] if self.teachers.strip() else []
        if any(not t for t in listed):
            raise KDError(f"--teachers={self.teachers!r} holds an empty name: write name,name,... with no "
                          "empty entries")
        if len(set(listed)) != len(listed):
            twice = sorted({t for t in listed if listed.count(t) > 1})
            raise KDError(f"--teachers names {', '.join(twice)} more than once: an ensemble's members are "
                          "distinct teachers")
        for name in listed:
            check_name(name, "teacher name")
        self._check_online()
        if self.synthetic_ratio and bool(self.synthetic_pool) == bool(self.synthetic_generator):
            given = "both --synthetic_pool and --synthetic_generator" if self.synthetic_pool else "neither"
            raise KDError(f"--synthetic_ratio={self.synthetic_ratio} needs one source of synthetic images, got "
                          f"{given}: pass --synthetic_generator=ARTIFACT (the run samples its own images; e.g. "
                          "`python -m kd.synthetic import` the authors' SN-GAN) or --synthetic_pool=POOL (`python -m "
                          "kd.synthetic generate`)")
        reads = set(LOSSES[self.loss].params)
        for other in LOSSES.values():
            for key in set(other.params) - reads:
                if getattr(self, key) != _FIELDS[key].default:
                    raise KDError(f"--{key} is a setting of another loss than --loss={self.loss}: drop it, or pass "
                                  f"the loss that reads it")

    def _check_online(self) -> None:
        if self.synthetic_mode != "online":
            for key in ("synthetic_generator_bn", "synthetic_temperature"):
                if getattr(self, key) != _FIELDS[key].default:
                    raise KDError(f"--{key} is a setting of --synthetic_mode=online: drop it, or pass "
                                  "--synthetic_mode=online")
            return
        if 0 < self.synthetic_temperature < 0.01:
            raise KDError(f"--synthetic_temperature must be 0 (= --temperature) or >= 0.01, got "
                          f"{self.synthetic_temperature}")
        if self.synthetic_pool:
            raise KDError("--synthetic_mode=online samples fresh images in every step: pass --synthetic_generator "
                          "in place of --synthetic_pool (a pool is the static protocol's)")

    @property
    def student_seed(self) -> int:
        return STUDENT_SEEDS + self.trial if self.seed < 0 else self.seed

    @property
    def run_seed(self) -> int:
        return self.student_seed

    def teacher_names(self) -> list[str]:
        return [t.strip() for t in self.teachers.split(",") if t.strip()]

    def run_name(self) -> str:
        return student_run_name(self)


# ------------------------------------------------------------------------------------------------ the grid
@dataclass(frozen=True)
class Axis:
    """One axis of the student grid: a :class:`DistillConfig` field, how it is shown, and its role.

    ``tag`` writes it into run names (``-T4``); ``named`` says when: "always" (the paper's axes, so every run
    name holds them) or "non_default" (an axis added later: existing run names stay as they were); the ensemble
    size and trial are written together as ``m{m}-t{t}`` (``n{k}-t{t}`` for k named teachers). ``group``: a report
    group holds the runs that agree in every group axis (the trial is the replicate within a group)."""

    key: str
    tag: str
    label: str
    named: str = "always"
    group: bool = True

    @property
    def field(self) -> dataclasses.Field:
        return _FIELDS[self.key]

    @property
    def default(self):
        return self.field.default

    def value(self, config: dict):
        """This axis's value in a run's config (its default where the run does not record it), typed as the field;
        the ensemble size is the number of teachers the run used."""
        if self.key == "ensemble_size" and isinstance(config.get(names.TEACHER_NAMES), list) \
                and config[names.TEACHER_NAMES]:
            return len(config[names.TEACHER_NAMES])
        raw = config.get(self.key, self.default)
        kind = {"int": int, "float": float, "str": str}.get(str(self.field.type), str)
        try:
            return round(float(raw), 6) if kind is float else kind(raw)
        except (TypeError, ValueError):
            raise KDError(f"a student run's config holds {self.key}={raw!r}, not a {kind.__name__}") from None

    def text(self, value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)


_FIELDS = {f.name: f for f in fields(DistillConfig)}
STUDENT_AXES: tuple[Axis, ...] = (
    Axis("ensemble_size", "m", "m"),
    Axis("trial", "t", "trial", group=False),
    Axis("synthetic_ratio", "r", "ratio"),
    Axis("temperature", "T", "tau"),
    Axis("loss", "L", "loss", named="non_default"),
    Axis("alpha", "a", "alpha", named="non_default"),
    Axis("synthetic_mode", "P", "protocol", named="non_default"),
)
GROUP_AXES = tuple(a for a in STUDENT_AXES if a.group)
AXIS = {a.key: a for a in STUDENT_AXES}


def student_run_name(cfg: DistillConfig) -> str:
    """``student-{dataset}-{arch}-m{m}-t{t}-r{ratio}-T{tau}[-{tag}{value} ...][-s{seed}]`` (``n{k}`` for k named
    teachers), the axes in :data:`STUDENT_AXES` order; ``-s{seed}`` only for an explicit ``--seed`` (the default
    seed is the trial's, :data:`STUDENT_SEEDS`)."""
    who = f"m{cfg.ensemble_size}" if not cfg.teachers else f"n{len(cfg.teacher_names())}"
    parts = [f"student-{cfg.dataset}-{names.arch_slug(cfg.arch)}-{who}-t{cfg.trial}"]
    for a in STUDENT_AXES:
        value = getattr(cfg, a.key)
        if a.key in ("ensemble_size", "trial") or (a.named == "non_default" and value == a.default):
            continue
        parts.append(f"{a.tag}{a.text(value)}")
    return "-".join(parts) + (f"-s{cfg.seed}" if cfg.seed >= 0 else "")
