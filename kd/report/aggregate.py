"""Finished student runs -> one run per grid point -> groups with n, mean, std, min and max per metric.

The grid is :data:`kd.config.STUDENT_AXES`, the one declaration of a student's axes: what a run's config says
for each axis (its default where the run does not record it), plus the dataset, the arch and the synthetic
source (the pool's generator).

* A grid point is (dataset, arch, synthetic source, every group axis, trial). The ensemble size is the number of
  teachers the run used. When several finished runs hold the same point (a sweep rerun elsewhere, online
  duplicates, the ensemble-size sweep overlapping Figure 1's), only the newest one counts (by when it last
  logged); :func:`dedupe` names the dropped runs in one warning.
* A group is a grid point without the trial: the group axes (:data:`kd.config.GROUP_AXES`: ensemble size,
  synthetic ratio, temperature, and any axis added since) and the source. Ratio-0 runs use no synthetic pool:
  their source is None and they belong to every generator's Figure 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kd import names
from kd.config import AXIS, GROUP_AXES, STUDENT_AXES
from kd.errors import KDError
from kd.report.runs import Run, warn

METRICS = (names.TEST_ACC, names.TEST_AGREEMENT, names.TEST_KL, names.TEST_ECE, names.TEACHER_ACC)
PERCENT = {names.TEST_ACC, names.TEST_AGREEMENT, names.TEST_ECE, names.TEACHER_ACC}  # fractions shown as %
LABELS = {names.TEST_ACC: "student acc", names.TEST_AGREEMENT: "agreement", names.TEST_KL: "KL (nats)",
          names.TEST_ECE: "ECE", names.TEACHER_ACC: "teacher acc"}
FIG1_SIZES = (1, 3)  # panel (a) self-distillation, panel (b) 3-teacher ensemble
UNKNOWN_SOURCE = "unknown"  # a run with synthetic data whose config does not name the pool's model
DATASET, ARCH = "dataset", "arch"
ENSEMBLE_SIZE, SYNTHETIC_RATIO, TEMPERATURE, TRIAL = "ensemble_size", "synthetic_ratio", "temperature", "trial"
PROTOCOL = "synthetic_mode"  # static pool or online samples: one line each in Figure 1, a category in the effect
FIGURE_AXES = (ENSEMBLE_SIZE, SYNTHETIC_RATIO, TEMPERATURE, PROTOCOL)  # the figures' own coordinates; other axes
# facet them
GRID_KEYS = tuple(a.key for a in STUDENT_AXES)  # a point of the grid, in this order
DEFAULTS = {a.key: a.default for a in STUDENT_AXES}


def rnd(x) -> float:
    """Grid coordinates compare after rounding (0.5 from YAML == 0.5 from a run config)."""
    return round(float(x), 6)


def axis_values(run: Run) -> dict:
    """Every student axis of ``run`` (:data:`kd.config.STUDENT_AXES`), typed."""
    try:
        return {a.key: a.value(run.config) for a in STUDENT_AXES}
    except KDError as e:
        raise KDError(f"student run {run.label} ({run.sources[0] if run.sources else '?'}): {e}") from None


def student_key(run: Run) -> tuple:
    """The group axes' values of ``run``, in :data:`kd.config.GROUP_AXES` order."""
    values = axis_values(run)
    return tuple(values[a.key] for a in GROUP_AXES)


def trial_of(run: Run) -> int:
    return axis_values(run)[TRIAL]


def source_of(run: Run) -> str | None:
    """The synthetic pool's model; None for a ratio-0 run (real data only: no pool)."""
    if axis_values(run)[SYNTHETIC_RATIO] == 0.0:
        return None
    return str(run.config.get(names.SYNTHETIC_SOURCE) or UNKNOWN_SOURCE)


def grid_point(run: Run) -> tuple:
    values = axis_values(run)
    return (str(run.config.get(DATASET)), str(run.config.get(ARCH)), source_of(run) or "",
            *(values[k] for k in GRID_KEYS))


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
    """The runs of one grid point without the trial: ``values`` holds its group axes (an axis it does not hold is
    at its default)."""

    values: dict
    runs: list[Run]
    stats: dict[str, dict]
    n_real: int | None
    n_synthetic: int | None
    synthetic_source: str | None = None  # None: real data only (ratio 0), in every generator's panel
    synthetic_fid: float | None = None  # the standard FID of the source, where the runs recorded one
    synthetic_fid_authors: float | None = None  # an imported generator's FID by its authors' own measure

    def get(self, key: str):
        return self.values.get(key, DEFAULTS[key])

    @property
    def ensemble_size(self) -> int:
        return self.get(ENSEMBLE_SIZE)

    @property
    def synthetic_ratio(self) -> float:
        return self.get(SYNTHETIC_RATIO)

    @property
    def temperature(self) -> float:
        return self.get(TEMPERATURE)

    @property
    def protocol(self) -> str:
        return self.get(PROTOCOL)

    @property
    def key(self) -> tuple:
        return tuple(self.get(a.key) for a in GROUP_AXES)

    @property
    def facet(self) -> tuple:
        """The values of the group axes the figures do not draw along (a second loss, say): one figure each."""
        return tuple((a.key, self.get(a.key)) for a in GROUP_AXES if a.key not in FIGURE_AXES)

    @property
    def order(self) -> tuple:
        return (*self.key, self.synthetic_source or "")


def _count(runs: list[Run], key: str, what: str, warnings: list[str]) -> int | None:
    vals = sorted({int(v) for r in runs if (v := r.value(key)) is not None})
    if len(vals) > 1:
        warn(warnings, f"{what}: runs disagree on {key} ({', '.join(map(str, vals))}); showing the median")
    return vals[len(vals) // 2] if vals else None


def fid_of(runs: list[Run], what: str, warnings: list[str], key: str = names.SYNTHETIC_FID) -> float | None:
    """The source's FID the runs recorded (config ``key``: ``synthetic_fid``, or ``synthetic_fid_authors``); None
    when none did."""
    vals = sorted({float(v) for r in runs if isinstance(v := r.config.get(key), (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)})
    if len(vals) > 1:
        warn(warnings, f"{what}: runs disagree on {key} ({', '.join(f'{v:g}' for v in vals)}); "
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
    """Groups of the (already deduplicated) students, sorted by their group axes, then source."""
    by_key: dict[tuple, list[Run]] = {}
    for run in students:
        by_key.setdefault((*student_key(run), source_of(run)), []).append(run)
    groups = []
    for key in sorted(by_key, key=lambda k: (*k[:-1], k[-1] or "")):
        runs = sorted(by_key[key], key=lambda r: (trial_of(r), r.id))
        values = dict(zip((a.key for a in GROUP_AXES), key[:-1]))
        what = point_text(values, source=key[-1])
        groups.append(Group(values, runs=runs, stats=_stats_of(runs, what, warnings),
                            n_real=_count(runs, names.N_REAL, what, warnings),
                            n_synthetic=_count(runs, names.N_SYNTHETIC, what, warnings),
                            synthetic_source=key[-1], synthetic_fid=fid_of(runs, what, warnings),
                            synthetic_fid_authors=fid_of(runs, what, warnings, names.SYNTHETIC_FID_AUTHORS)))
    return groups


def point_text(values: dict, trial=None, source=None) -> str:
    """``ensemble_size=3 synthetic_ratio=0.5 temperature=1`` (an added axis only where it is not at its default)."""
    shown = [f"{a.key}={a.text(values.get(a.key, a.default))}" for a in GROUP_AXES
             if a.named == "always" or values.get(a.key, a.default) != a.default]
    s = " ".join(shown)
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


def source_fid(groups: list[Group], source: str, authors: bool = False) -> float | None:
    """The source's standard FID (``authors``: its authors' own measure), None when unknown."""
    field = "synthetic_fid_authors" if authors else "synthetic_fid"
    fids = sorted({v for g in groups if g.synthetic_source == source and (v := getattr(g, field)) is not None})
    return fids[len(fids) // 2] if fids else None


def facets(groups: list[Group]) -> list[tuple]:
    """The study's facets (:attr:`Group.facet`), sorted: one set of figures each (a study of one loss has one)."""
    return sorted({g.facet for g in groups}, key=lambda f: tuple(str(v) for _, v in f))


def in_facet(groups: list[Group], facet: tuple) -> list[Group]:
    return [g for g in groups if g.facet == facet]


def facet_text(facet: tuple) -> str:
    """``loss kd_nll`` for a facet whose axes are not all at their defaults; empty for the default one."""
    return " · ".join(f"{AXIS[k].label} {AXIS[k].text(v)}" for k, v in facet if v != AXIS[k].default)


def fig1_temperature(groups: list[Group]) -> float | None:
    temps = sorted({g.temperature for g in groups if g.ensemble_size in FIG1_SIZES})
    if not temps:
        return None
    return 1.0 if 1.0 in temps else temps[0]
