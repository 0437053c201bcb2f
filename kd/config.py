"""Run configuration: plain dataclasses, set from the command line as ``--key=value``.

The command line *is* the W&B config: every field here is logged, and a W&B sweep passes its parameters
back as ``--key=value`` (booleans as ``True``/``False``). Each field declares its meaning, its allowed values
or range and its default once, with :func:`setting`; validation and ``--help`` are both generated from that.
Unknown flags, wrong types and out-of-range values are refused with one line that names the problem and the
fix (:class:`~kd.errors.KDError`, exit code 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field, fields

from kd import names
from kd.datasets import DATASETS
from kd.errors import KDError, check_name

SEED_MAX = 2**32 - 1  # numpy's and torch's generators take seeds up to this
# keys W&B hands back on resume (the stored config) that the programs add themselves: ignored, with one line
RUN_KEYS = {names.JOB, names.RUN_NAME, names.TEACHER_NAMES, names.TEACHER_HASHES, names.TEACHER_VERSIONS,
            names.SYNTHETIC_POOL_SHA, names.SYNTHETIC_SOURCE, names.SYNTHETIC_FID, "n_real", "n_synthetic", "n_params",
            "n_train", "wandb_version", "recipe"}  # recipe: a generator run's resolved preset


def fingerprint(identity: dict) -> str:
    """10 hex digits of the sha256 of a configuration's identity (JSON, keys sorted): names its run folder."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]


def setting(default, help: str, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
            choices=None, name: bool = False):
    """A config field with its documentation and its allowed values (checked by :func:`check_fields`)."""
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices,
            "name": name}
    return field(default=default, metadata=meta)


def allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("choices"):
        return " | ".join(map(str, m["choices"]))
    if m.get("name"):
        return "a name: letters, digits, . _ -"
    if m.get("lo") is None and m.get("hi") is None:
        return ""
    lo = "-inf" if m["lo"] is None else _num(m["lo"])
    hi = "inf" if m["hi"] is None else _num(m["hi"])
    return f"{'(' if m['lo_open'] else '['}{lo}, {hi}{')' if m['hi_open'] else ']'}"


def check_fields(cfg) -> None:
    """Every field against its declared choices, range or name rule."""
    for f in fields(cfg):
        m, v = f.metadata, getattr(cfg, f.name)
        if not m:
            continue
        if m.get("choices") and str(v) not in map(str, m["choices"]):
            options = [str(c) for c in m["choices"]]
            if f.name == "dataset":
                raise KDError(f"unknown dataset {v!r}: choose one of {', '.join(sorted(options))}")
            listed = ", ".join(options[:-1]) + f" or {options[-1]}" if len(options) > 1 else options[0]
            raise KDError(f"--{f.name} must be {listed}, got {v!r}")
        if m.get("name") and v != "":
            check_name(v, f.name)
        if m.get("lo") is None and m.get("hi") is None:
            continue
        bad = isinstance(v, float) and not math.isfinite(v)
        bad = bad or (m["lo"] is not None and (v <= m["lo"] if m["lo_open"] else v < m["lo"]))
        bad = bad or (m["hi"] is not None and (v >= m["hi"] if m["hi_open"] else v > m["hi"]))
        if bad:
            raise KDError(f"--{f.name} must be {_rule(f)}, got {v} ({m['help']})")


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _rule(f: dataclasses.Field) -> str:
    """``a finite number > 0 and <= 10``, ``>= 1 and <= 10000``: the range in words."""
    m = f.metadata
    parts = []
    if m["lo"] is not None:
        parts.append(f"{'>' if m['lo_open'] else '>='} {_num(m['lo'])}")
    if m["hi"] is not None:
        parts.append(f"{'<' if m['hi_open'] else '<='} {_num(m['hi'])}")
    return ("a finite number " if _type(f) is float else "") + " and ".join(parts)


def check_arch(arch: str) -> None:
    """``preresnet{depth}`` with a valid depth, or ``timm:{name}`` of a model timm knows."""
    m = names.PRERESNET.match(arch)
    if m:
        if not names.valid_preresnet_depth(int(m.group(1))):
            raise KDError(f"invalid depth in {arch!r}: use depth = 6n+2 below 44 (8, 14, 20, 26, 32, 38) "
                          "or 9n+2 from 44 to 1001 (47, 56, 65, ..., 110)")
        return
    if arch.startswith("timm:"):
        import timm

        if arch[5:] not in timm.list_models():
            raise KDError(f"unknown timm model {arch[5:]!r}: see timm.list_models() for the names")
        return
    raise KDError(f"unknown arch {arch!r}: use preresnet{{depth}} (e.g. preresnet56) or timm:{{name}}")


@dataclass
class TrainConfig:
    """Teacher training; defaults are the paper's teacher recipe (App. A.3)."""

    dataset: str = setting("cifar10", "training data", choices=DATASETS)
    arch: str = setting("preresnet56", "network: preresnet{depth} (the authors' PreResNet) or timm:{name}")
    seed: int = setting(0, "seed of weights and data order (teacher i of an ensemble uses seed i)", lo=0,
                        hi=SEED_MAX)
    epochs: int = setting(200, "passes over the real training data", lo=1, hi=10_000)
    batch_size: int = setting(256, "images per optimizer step (all processes together)", lo=1, hi=65_536)
    lr: float = setting(0.1, "peak learning rate, cosine-annealed once per epoch", lo=0, hi=10, lo_open=True)
    eta_min: float = setting(0.0, "learning rate after the last epoch (<= lr)", lo=0, hi=10)
    momentum: float = setting(0.9, "SGD momentum", lo=0, hi=1, hi_open=True)
    nesterov: bool = setting(False, "Nesterov momentum", choices=(True, False))
    weight_decay: float = setting(1e-4, "L2 weight decay on every parameter", lo=0, hi=1, hi_open=True)
    mixed_precision: str = setting("no", "autocast through Accelerate", choices=("no", "bf16", "fp16"))
    channels_last: bool = setting(True, "NHWC memory format (faster convolutions on GPUs)", choices=(True, False))
    compile: bool = setting(False, "torch.compile the model", choices=(True, False))
    cpu: bool = setting(False, "force the CPU even where a GPU exists", choices=(True, False))
    eval_every: int = setting(1, "epochs between test-set evaluations (the last epoch always)", lo=1, hi=10_000)
    data_dir: str = setting("data", "folder of the CIFAR archives (downloaded there when missing)")
    out_dir: str = setting("runs", "folder of run folders (checkpoints, final weights)")
    store: str = setting("", "local artifact store; empty: $KD_STORE, else ./artifacts")
    project: str = setting(names.PROJECT, "W&B project", name=True)
    study: str = setting("default", "label grouping the runs of one reproduction (the report reads it)",
                         name=True)
    resume: str = setting("auto", "auto: continue a matching checkpoint | True: one must exist | False: restart",
                          choices=("auto", "True", "False"))

    kind = names.TEACHER

    def validate(self) -> None:
        check_fields(self)
        check_arch(self.arch)
        if self.eta_min > self.lr:
            raise KDError(f"--eta_min ({self.eta_min}) must not exceed --lr ({self.lr})")

    def run_name(self) -> str:
        return names.teacher_artifact(self.dataset, self.arch, self.seed)

    def identity(self) -> dict:
        """The fields that define what is computed (not where it is written or how it is resumed)."""
        skip = {"resume", "out_dir", "data_dir", "store", "project", "eval_every", "cpu", "compile"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def fingerprint(self) -> str:
        return fingerprint(self.identity())


@dataclass
class DistillConfig(TrainConfig):
    """Student distillation; defaults are the paper's student recipe (App. A.3, Eq. 1)."""

    seed: int = setting(-1, "student seed; -1: the trial number", lo=-1, hi=SEED_MAX)
    epochs: int = setting(300, "passes over the real training data", lo=1, hi=10_000)
    batch_size: int = setting(128, "images per optimizer step, real + synthetic", lo=1, hi=65_536)
    lr: float = setting(0.05, "peak learning rate, cosine-annealed once per epoch", lo=0, hi=10, lo_open=True)
    eta_min: float = setting(1e-6, "learning rate after the last epoch (<= lr)", lo=0, hi=10)
    nesterov: bool = setting(True, "Nesterov momentum", choices=(True, False))
    teachers: str = setting("", "comma-separated teacher artifact names; empty: --ensemble_size/--trial")
    teacher_arch: str = setting("", "arch of the teachers --ensemble_size chooses; empty: --arch")
    ensemble_size: int = setting(1, "teachers in the ensemble (a block of the study's teachers)", lo=1, hi=1000)
    teacher_pool: int = setting(0, "the study's teachers are seeds 0..N-1 (N = this); 0: every teacher holding the "
                                "study's alias", lo=0, hi=10_000)
    trial: int = setting(0, "trial number: picks the teacher block (t*m mod N) and the default seed", lo=0,
                         hi=1_000_000)
    temperature: float = setting(1.0, "distillation temperature tau of Eq. 1", lo=0.01, hi=100)
    synthetic_ratio: float = setting(0.0, "synthetic images per real image added (0.25 = +12.5k on CIFAR)",
                                     lo=0, hi=100)
    synthetic_pool: str = setting("", "a pool file or a synthetic-* artifact name (needed when ratio > 0)")
    teacher_cache: bool = setting(True, "reuse teacher outputs over the enumerable views (exact)",
                                  choices=(True, False))
    cache_dtype: str = setting("float32", "storage of cached teacher log-probs",
                               choices=("float32", "float16", "bfloat16"))

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
        if not self.synthetic_ratio:  # real data only: the same run whichever pool a sweep names
            d.pop("synthetic_pool")
        return d


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _type(f: dataclasses.Field):
    return f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]


def _convert(f: dataclasses.Field, raw: str, flag: str):
    t = _type(f)
    low = raw.lower()
    if t is bool:
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise KDError(f"--{flag} expects True or False, got {raw!r}")
    if t is int:
        try:
            as_float = float(raw)
        except ValueError:
            raise KDError(f"--{flag} expects an integer, got {raw!r}") from None
        if not as_float.is_integer():
            raise KDError(f"--{flag} expects an integer, got {raw!r}")
        return int(as_float) if abs(as_float) < 2**53 else int(raw)
    if t is float:
        try:
            return float(raw)
        except ValueError:
            raise KDError(f"--{flag} expects a number, got {raw!r}") from None
    if f.name == "resume":  # accept true/false in any case
        return "True" if low in _TRUE else "False" if low in _FALSE else raw
    return raw


def _split(argv: list[str], known: dict) -> tuple[list[tuple[str, str | None]], list[str]]:
    """``--key=value`` / ``--key value`` / ``--flag`` into (key, raw) pairs, and W&B's own keys passed back."""
    pairs, ignored, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise KDError(f"unexpected argument {arg!r}: settings are written --key=value (see --help)")
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in known and (key in RUN_KEYS or key.startswith("_wandb")):
            ignored.append(key)
        elif key not in known:
            close = [k for k in known if k.startswith(key[:3])]
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise KDError(f"unknown flag --{key}{hint}: see --help for the {len(known)} known settings")
        elif not eq and _type(known[key]) is not bool:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                raw = argv[i]
            else:
                raise KDError(f"--{key} needs a value: write --{key}=VALUE")
            pairs.append((key, raw))
        else:
            pairs.append((key, raw if eq else "True"))
        i += 1
    return pairs, ignored


def parse_flags(cls, argv: list[str] | None = None, notes: bool = True):
    """``--key=value`` / ``--key value`` / ``--flag`` (True) into a validated ``cls`` instance.

    Keys a W&B resume or agent hands back that the program records itself (``job``, ``teacher_names``, ...)
    are ignored with one line naming them (``notes``); any other unknown flag is refused.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(usage(cls))
        raise SystemExit(0)
    known = {f.name: f for f in fields(cls)}
    pairs, ignored = _split(argv, known)
    if ignored and notes:
        print(f"note: ignoring keys W&B passed back that the program records itself: "
              f"{', '.join(sorted(set(ignored)))}", file=sys.stderr)
    cfg = cls(**{k: _convert(known[k], raw, k) for k, raw in pairs})
    cfg.validate()
    return cfg


def usage(cls) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()[0]
    lines = [f"{doc}", "settings (--key=value; booleans True/False):"]
    for f in fields(cls):
        m = f.metadata
        rule = allowed(f)
        default = f.default if f.default != "" else '""'
        kind = "one of " if m.get("choices") else "range " if rule and not m.get("name") else ""
        rule = f"; {kind}{rule}" if rule else ""
        lines.append(f"  --{f.name}={default}".ljust(34) + f"  {m.get('help', '')}{rule}")
    return "\n".join(lines)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
