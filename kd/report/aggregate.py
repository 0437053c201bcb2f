"""Finished student runs -> one run per grid point -> groups with n, mean, std, min and max per metric.

* A grid point is (dataset, arch, synthetic source, ensemble size = the number of teachers actually used,
  synthetic_ratio, temperature, trial). When several finished runs hold the same point (a sweep rerun
  elsewhere, online duplicates, the ensemble-size sweep overlapping Figure 1's), only the newest one counts
  (by when it last logged); :func:`dedupe` names the dropped runs in one warning.
* A group is a grid point without the trial: (ensemble_size, synthetic_ratio, temperature, source). Ratio-0
  runs use no synthetic pool: their source is None and they belong to every generator's Figure 1.
* The grid defaults (a run config without ``ensemble_size`` etc.) are :class:`kd.config.DistillConfig`'s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from kd import names
from kd.config import DistillConfig
from kd.errors import KDError
from kd.report.runs import Run, warn

METRICS = (names.TEST_ACC, names.TEST_AGREEMENT, names.TEST_KL, names.TEST_ECE, names.TEACHER_ACC)
PERCENT = {names.TEST_ACC, names.TEST_AGREEMENT, names.TEST_ECE, names.TEACHER_ACC}  # fractions shown as %
LABELS = {names.TEST_ACC: "student acc", names.TEST_AGREEMENT: "agreement", names.TEST_KL: "KL (nats)",
          names.TEST_ECE: "ECE", names.TEACHER_ACC: "teacher acc"}
FIG1_SIZES = (1, 3)  # panel (a) self-distillation, panel (b) 3-teacher ensemble
UNKNOWN_SOURCE = "unknown"  # a run with synthetic data whose config does not name the pool's model

_FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}


def _field(name: str) -> str:
    """A DistillConfig field name (the run config key the student logs): fails at import if renamed."""
    if name not in _FIELDS:
        raise AssertionError(f"kd.config.DistillConfig has no field {name!r}")
    return name


DATASET, ARCH = _field("dataset"), _field("arch")
ENSEMBLE_SIZE, SYNTHETIC_RATIO = _field("ensemble_size"), _field("synthetic_ratio")
TEMPERATURE, TRIAL = _field("temperature"), _field("trial")
GRID_KEYS = (ENSEMBLE_SIZE, SYNTHETIC_RATIO, TEMPERATURE, TRIAL)
DEFAULTS = {k: _FIELDS[k].default for k in GRID_KEYS}


def rnd(x) -> float:
    """Grid coordinates compare after rounding (0.5 from YAML == 0.5 from a run config)."""
    return round(float(x), 6)


def student_key(run: Run) -> tuple[int, float, float]:
    """(ensemble_size, synthetic_ratio, temperature); the size is the number of teachers actually used."""
    c = run.config
    used = c.get(names.TEACHER_NAMES)
    try:
        m = len(used) if isinstance(used, list) and used else int(c.get(ENSEMBLE_SIZE, DEFAULTS[ENSEMBLE_SIZE]))
        return (m, rnd(c.get(SYNTHETIC_RATIO, DEFAULTS[SYNTHETIC_RATIO])),
                rnd(c.get(TEMPERATURE, DEFAULTS[TEMPERATURE])))
    except (TypeError, ValueError) as e:
        raise KDError(f"student run {run.label} ({run.sources[0] if run.sources else '?'}) has no usable "
                      f"{ENSEMBLE_SIZE} / {SYNTHETIC_RATIO} / {TEMPERATURE} in its config ({e!r})") from None


def trial_of(run: Run) -> int:
    try:
        return int(run.config.get(TRIAL, DEFAULTS[TRIAL]))
    except (TypeError, ValueError):
        raise KDError(f"student run {run.label} has a non-integer {TRIAL} in its config") from None


def source_of(run: Run) -> str | None:
    """The synthetic pool's model; None for a ratio-0 run (real data only: no pool)."""
    if student_key(run)[1] == 0.0:
        return None
    return str(run.config.get(names.SYNTHETIC_SOURCE) or UNKNOWN_SOURCE)


def grid_point(run: Run) -> tuple:
    return (str(run.config.get(DATASET)), str(run.config.get(ARCH)), source_of(run) or "", *student_key(run),
            trial_of(run))


def dedupe(students: list[Run], warnings: list[str]) -> tuple[list[Run], list[tuple[Run, Run]]]:
    """One run per grid point, the newest (latest ``time``, then id); returns the kept runs (in their order)
    and each dropped run with the run kept in its place, named in one warning."""
    by_point: dict[tuple, list[Run]] = {}
    for run in students:
        by_point.setdefault(grid_point(run), []).append(run)
    newest = {p: max(rs, key=lambda r: (-math.inf if r.time is None else r.time, r.id))
              for p, rs in by_point.items()}
    kept = [r for r in students if newest[grid_point(r)] is r]
    dropped = [(r, newest[grid_point(r)]) for r in students if newest[grid_point(r)] is not r]
    if dropped:
        warn(warnings, f"{len(dropped)} duplicate run(s) dropped: another finished run holds the same grid point "
             "and only the newest counts: " + ", ".join(f"{r.label} (kept {k.label})" for r, k in dropped))
    return kept, dropped


def stats(values: list[float]) -> dict:
    """n, mean, std (n - 1 denominator; None for n < 2), min, max; a NaN propagates (never dropped)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    nan = any(math.isnan(v) for v in values)
    return {"n": n, "mean": mean, "std": std, "min": math.nan if nan else min(values),
            "max": math.nan if nan else max(values)}


@dataclass
class Group:
    ensemble_size: int
    synthetic_ratio: float
    temperature: float
    runs: list[Run]
    stats: dict[str, dict]
    n_real: int | None
    n_synthetic: int | None
    synthetic_source: str | None = None  # None: real data only (ratio 0), in every generator's panel
    synthetic_fid: float | None = None

    @property
    def key(self) -> tuple[int, float, float]:
        return self.ensemble_size, self.synthetic_ratio, self.temperature

    @property
    def order(self) -> tuple:
        return (*self.key, self.synthetic_source or "")


def _count(runs: list[Run], key: str, what: str, warnings: list[str]) -> int | None:
    vals = sorted({int(v) for r in runs if (v := r.value(key)) is not None})
    if len(vals) > 1:
        warn(warnings, f"{what}: runs disagree on {key} ({', '.join(map(str, vals))}); showing the median")
    return vals[len(vals) // 2] if vals else None


def fid_of(runs: list[Run], what: str, warnings: list[str]) -> float | None:
    """The pool's FID the runs recorded (config ``synthetic_fid``); None when none did."""
    vals = sorted({float(v) for r in runs if isinstance(v := r.config.get(names.SYNTHETIC_FID), (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)})
    if len(vals) > 1:
        warn(warnings, f"{what}: runs disagree on {names.SYNTHETIC_FID} ({', '.join(f'{v:g}' for v in vals)}); "
             "showing the median")
    return vals[len(vals) // 2] if vals else None


def _stats_of(runs: list[Run], what: str, warnings: list[str]) -> dict[str, dict]:
    per_metric = {}
    for metric in METRICS:
        vals = [float(v) for r in runs if isinstance(v := r.value(metric), (int, float))]
        per_metric[metric] = stats(vals)
        if 0 < len(vals) < len(runs):
            lacking = [r.label for r in runs if not isinstance(r.value(metric), (int, float))]
            warn(warnings, f"{what}: {metric} missing in {', '.join(lacking)}")
        if any(not math.isfinite(v) for v in vals):
            warn(warnings, f"{what}: {metric} is not finite in some runs; its mean is NaN")
    return per_metric


def group_students(students: list[Run], warnings: list[str]) -> list[Group]:
    """Groups of the (already deduplicated) students, sorted by (m, ratio, tau, source)."""
    by_key: dict[tuple, list[Run]] = {}
    for run in students:
        by_key.setdefault((*student_key(run), source_of(run)), []).append(run)
    groups = []
    for key in sorted(by_key, key=lambda k: (*k[:3], k[3] or "")):
        runs = sorted(by_key[key], key=lambda r: (trial_of(r), r.id))
        what = point_text(*key[:3], source=key[3])
        groups.append(Group(*key[:3], runs=runs, stats=_stats_of(runs, what, warnings),
                            n_real=_count(runs, names.N_REAL, what, warnings),
                            n_synthetic=_count(runs, names.N_SYNTHETIC, what, warnings),
                            synthetic_source=key[3], synthetic_fid=fid_of(runs, what, warnings)))
    return groups


def point_text(m, r, t, trial=None, source=None) -> str:
    s = f"{ENSEMBLE_SIZE}={m} {SYNTHETIC_RATIO}={r:g} {TEMPERATURE}={t:g}"
    s = s if trial is None else f"{s} {TRIAL}={trial}"
    return s if not source else f"{s} {names.SYNTHETIC_SOURCE}={source}"


def only(values: set, what: str, study: str) -> str:
    if len(values) > 1:
        raise KDError(f"study {study} mixes {what}s ({', '.join(sorted(map(str, values)))}): one study per "
                      f"{what}, so that each figure compares like with like")
    return str(next(iter(values))) if values else "?"


def sources(groups: list[Group]) -> list[str]:
    """The synthetic sources of the study, sorted (the first one's Figure 1 is fig1.png)."""
    return sorted({g.synthetic_source for g in groups if g.synthetic_source is not None})


def for_source(groups: list[Group], source: str | None) -> list[Group]:
    """The groups of one generator's Figure 1: its own and the real-only (ratio 0) ones."""
    return [g for g in groups if g.synthetic_source is None or source is None or g.synthetic_source == source]


def source_fid(groups: list[Group], source: str) -> float | None:
    fids = sorted({g.synthetic_fid for g in groups if g.synthetic_source == source and g.synthetic_fid is not None})
    return fids[len(fids) // 2] if fids else None


def fig1_temperature(groups: list[Group]) -> float | None:
    temps = sorted({g.temperature for g in groups if g.ensemble_size in FIG1_SIZES})
    if not temps:
        return None
    return 1.0 if 1.0 in temps else temps[0]
