"""Run configuration: plain dataclasses, set from the command line as ``--key=value``.

The command line *is* the W&B config: every field here is logged, and a W&B sweep passes its parameters
back as ``--key=value`` (booleans as ``True``/``False``). Unknown flags, wrong types and out-of-range
values are refused with one line that names the problem and the fix (:class:`KDError`, exit code 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field, fields

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class KDError(Exception):
    """An error a user can fix: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the ``python -m kd.*`` commands: a usage error is one line and exit code 2, like KDError."""

    def error(self, message: str):
        self.exit(2, f"error: {message}: see {self.prog} --help\n")


def check_name(value: str, what: str) -> str:
    """Artifact, study and run names: no path separators, no '..', nothing that escapes a folder."""
    if not NAME_RE.match(value) or ".." in value:
        raise KDError(
            f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' only "
            "(no '/', no '..', at most 128 characters)"
        )
    return value


@dataclass
class TrainConfig:
    """Teacher training; defaults are the paper's teacher recipe (App. A.3)."""

    dataset: str = "cifar10"
    arch: str = "preresnet56"
    seed: int = 0
    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.1
    eta_min: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    mixed_precision: str = "no"  # no | bf16 | fp16 (through Accelerate)
    channels_last: bool = True
    compile: bool = False
    cpu: bool = False  # force the CPU even where a GPU exists
    eval_every: int = 1
    data_dir: str = "data"
    out_dir: str = "runs"
    store: str = ""  # local artifact store; "" -> $KD_STORE or ./artifacts
    project: str = "kd-fidelity"
    study: str = "default"
    resume: str = "auto"  # auto: continue a matching checkpoint if one exists | True: must exist | False: restart

    kind = "teacher"

    def validate(self) -> None:
        from kd.data import DATASETS
        from kd.models import check_arch

        if self.dataset not in DATASETS:
            raise KDError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(sorted(DATASETS))}")
        check_arch(self.arch)
        check_name(self.study, "study")
        check_name(self.project, "project")
        _positive_int(self, "epochs")
        _positive_int(self, "batch_size")
        _positive_int(self, "eval_every")
        if self.seed < 0 and type(self) is TrainConfig:
            raise KDError(f"--seed must be >= 0, got {self.seed}")
        for name in ("lr", "weight_decay", "momentum", "eta_min"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise KDError(f"--{name} must be a finite number >= 0, got {v}")
        if self.lr <= 0:
            raise KDError(f"--lr must be > 0, got {self.lr}")
        if self.eta_min > self.lr:
            raise KDError(f"--eta_min ({self.eta_min}) must not exceed --lr ({self.lr})")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise KDError(f"--mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if str(self.resume) not in ("auto", "True", "False"):
            raise KDError(f"--resume must be auto, True or False, got {self.resume!r}")

    def run_name(self) -> str:
        return f"teacher-{self.dataset}-{self.arch}-s{self.seed}"

    def identity(self) -> dict:
        """The fields that define what is computed (not where it is written or how it is resumed)."""
        skip = {"resume", "out_dir", "data_dir", "store", "project", "eval_every", "cpu", "compile"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def fingerprint(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


@dataclass
class DistillConfig(TrainConfig):
    """Student distillation; defaults are the paper's student recipe (App. A.3, Eq. 1)."""

    seed: int = -1  # -1: use --trial as the student's seed
    epochs: int = 300
    batch_size: int = 128
    lr: float = 0.05
    eta_min: float = 1e-6
    nesterov: bool = True
    teachers: str = ""  # comma-separated teacher artifact names; else --ensemble_size/--trial
    teacher_arch: str = ""  # arch of the teachers chosen by --ensemble_size ("" -> --arch)
    ensemble_size: int = 1
    trial: int = 0
    temperature: float = 1.0
    synthetic_ratio: float = 0.0
    synthetic_pool: str = ""  # a pool file, or a synthetic-* artifact name
    teacher_cache: bool = True  # reuse teacher outputs over the enumerable views (exact)
    cache_dtype: str = "float32"  # float32 | float16 | bfloat16 storage of cached log-probs

    kind = "student"

    def validate(self) -> None:
        super().validate()
        if self.ensemble_size < 1:
            raise KDError(f"--ensemble_size must be >= 1, got {self.ensemble_size}")
        if self.trial < 0:
            raise KDError(f"--trial must be >= 0, got {self.trial}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise KDError(f"--temperature must be a finite number > 0, got {self.temperature}")
        if not math.isfinite(self.synthetic_ratio) or self.synthetic_ratio < 0:
            raise KDError(f"--synthetic_ratio must be a finite number >= 0, got {self.synthetic_ratio}")
        if self.cache_dtype not in ("float32", "float16", "bfloat16"):
            raise KDError(f"--cache_dtype must be float32, float16 or bfloat16, got {self.cache_dtype!r}")
        if self.teacher_arch:
            from kd.models import check_arch

            check_arch(self.teacher_arch)
        for name in self.teacher_names():
            check_name(name, "teacher name")

    @property
    def student_seed(self) -> int:
        return self.trial if self.seed < 0 else self.seed

    def teacher_names(self) -> list[str]:
        return [t.strip() for t in self.teachers.split(",") if t.strip()]

    def run_name(self) -> str:
        who = f"m{self.ensemble_size}-t{self.trial}" if not self.teachers else f"n{len(self.teacher_names())}"
        return (
            f"student-{self.dataset}-{self.arch}-{who}-r{self.synthetic_ratio:g}-T{self.temperature:g}"
            f"-s{self.student_seed}"
        )

    def identity(self) -> dict:
        d = super().identity()
        d.pop("teacher_cache")  # exact either way: same targets
        d.pop("cache_dtype")
        return d


CONFIGS = {"teacher": TrainConfig, "student": DistillConfig}


def _positive_int(cfg, name: str) -> None:
    v = getattr(cfg, name)
    if v < 1:
        raise KDError(f"--{name} must be >= 1, got {v}")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(f: dataclasses.Field, raw: str, flag: str):
    t = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    if t is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise KDError(f"--{flag} expects True or False, got {raw!r}")
    if t is int:
        try:
            as_float = float(raw)
        except ValueError:
            raise KDError(f"--{flag} expects an integer, got {raw!r}") from None
        if not as_float.is_integer():
            raise KDError(f"--{flag} expects an integer, got {raw!r}")
        return int(as_float)
    if t is float:
        try:
            return float(raw)
        except ValueError:
            raise KDError(f"--{flag} expects a number, got {raw!r}") from None
    if f.name == "resume":  # accept true/false in any case
        low = raw.lower()
        return "True" if low in _TRUE else "False" if low in _FALSE else raw
    return raw


def parse_flags(cls, argv: list[str] | None = None):
    """``--key=value`` / ``--key value`` / ``--flag`` (True) into a validated ``cls`` instance."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known = {f.name: f for f in fields(cls)}
    values: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(usage(cls))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise KDError(f"unexpected argument {arg!r}: settings are written --key=value (see --help)")
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in known:
            close = [k for k in known if k.startswith(key[:3])]
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise KDError(f"unknown flag --{key}{hint}: see --help for the {len(known)} known settings")
        f = known[key]
        if not eq:
            if f.type in (bool, "bool"):
                raw = "True"
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                raw = argv[i]
            else:
                raise KDError(f"--{key} needs a value: write --{key}=VALUE")
        values[key] = _convert(f, raw, key)
        i += 1
    cfg = cls(**values)
    cfg.validate()
    return cfg


def usage(cls) -> str:
    lines = [f"settings (all --key=value; defaults are the paper's {cls.kind} recipe):"]
    for f in fields(cls):
        lines.append(f"  --{f.name}={f.default}")
    return "\n".join(lines)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


__all__ = ["KDError", "TrainConfig", "DistillConfig", "parse_flags", "check_name", "field"]
