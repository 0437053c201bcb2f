"""Which grid points a study should hold, and a warning for each one without a finished run.

* Default (no ``--expect``): Figure 1 needs sizes {1, 3} x every synthetic ratio present (per generator when
  the study uses several; ``--expect-paper-grid`` adds the paper's ratios), Figure 2 every size x
  temperature at ratio 0.
* ``--expect=SWEEP_DIR``: every point of the student grid sweeps there, over every student axis
  (:data:`kd.config.STUDENT_AXES`); a parameter a spec leaves out takes DistillConfig's default. A point counts
  as present when any generator holds it (the specs name pools, not generators).
* ``--expect=SWEEP_DIR`` also decides which runs belong to the study's grid (:func:`split_by_grid`): a run counts
  only if its config holds, for every key of a student run's identity (every :class:`~kd.config.DistillConfig`
  field that is part of the identity, :func:`kd.flags.identity`: the whole recipe, not only the keys a spec names),
  one of that spec's values, and DistillConfig's default for a key the spec does not name (a run that does not
  record a key took its default); a key the identity leaves out for a run is not compared (the pool of a
  real-only run: the run does not depend on it). Any other run of the study (an ad-hoc
  ``distill.py --study=S --lr=0.01`` or ``--weight_decay=0.001``, say) is named as not in the study's grid and
  never averaged into a grid point.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

from kd import names
from kd.config import AXIS, DistillConfig
from kd.errors import KDError
from kd.report.aggregate import (
    DEFAULTS,
    FIG1_SIZES,
    GRID_KEYS,
    TRIAL,
    Group,
    axis_values,
    facets,
    fig1_temperature,
    for_source,
    in_facet,
    point_text,
    rnd,
    sources,
)
from kd.report.runs import Run, warn

PAPER_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


def expected_default(groups: list[Group], paper_grid: bool) -> dict[tuple, str]:
    """(m, ratio, tau, source) -> figure: Fig 1 sizes {1, 3} x ratios present (+ the paper's) per source;
    Fig 2 sizes x temperatures at ratio 0 (source None)."""
    points: dict[tuple, str] = {}
    tau = fig1_temperature(groups)
    tau = 1.0 if tau is None else tau
    for src in sources(groups) or [None]:
        ratios = {g.synthetic_ratio for g in for_source(groups, src)}
        ratios |= set(map(rnd, PAPER_RATIOS)) if paper_grid else set()
        for m, r in itertools.product(FIG1_SIZES, sorted(ratios)):
            points[(m, r, tau, src if r else None)] = "fig1"
    at0 = [g for g in groups if g.synthetic_ratio == 0.0]
    sizes, temps = sorted({g.ensemble_size for g in at0}), sorted({g.temperature for g in at0})
    for m, t in itertools.product(sizes, temps):
        points.setdefault((m, 0.0, t, None), "fig2")
    return points


def _param_values(spec: dict, key: str, src: Path) -> list:
    p = (spec.get("parameters") or {}).get(key)
    if p is None:
        return [DEFAULTS[key]]
    if isinstance(p, dict) and "values" in p:
        vals = p["values"]
    elif isinstance(p, dict) and "value" in p:
        vals = [p["value"]]
    else:
        raise KDError(f"--expect: {src} parameter {key} has no values/value list, so it defines no grid")
    try:
        return [AXIS[key].value({key: v}) for v in vals]
    except KDError:
        raise KDError(f"--expect: {src} parameter {key} has a value of the wrong type in {vals!r}") from None


def spec_files(path: Path) -> list[Path]:
    """The sweep specs --expect names (checked before any run is read)."""
    files = [path] if path.is_file() else sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
    if not path.exists() or not files:
        raise KDError(f"--expect={path}: no sweep specs (*.yaml) there")
    return files


def _student_grid(f: Path, study: str, warnings: list[str]) -> dict | None:
    """The spec of a student grid sweep of ``study``, else None (a teacher sweep, another study, not a grid)."""
    import yaml

    try:
        spec = yaml.safe_load(f.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise KDError(f"--expect: cannot read sweep spec {f}: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise KDError(f"--expect: {f} is not a W&B sweep spec (a YAML mapping)")
    params = spec.get("parameters") or {}
    if "distill" not in str(spec.get("program", "")) and not set(params) & set(DEFAULTS):
        return None  # a teacher sweep
    named = (params.get(names.STUDY) or {}).get("value") if isinstance(params.get(names.STUDY), dict) else None
    if named is not None and str(named) != study:
        warn(warnings, f"--expect: {f} is a sweep of study {named}, not {study}; not checked")
        return None
    if spec.get("method", "grid") != "grid":
        warn(warnings, f"--expect: {f} is a {spec.get('method')} sweep, not a grid; not checked")
        return None
    return spec


def expected_from_specs(path: str | Path, study: str, warnings: list[str]) -> dict[tuple, str]:
    """The points (every student axis, in :data:`GRID_KEYS` order) of the student grid sweeps in a folder (or a
    file)."""
    points: dict[tuple, str] = {}
    for f in spec_files(Path(path)):
        spec = _student_grid(f, study, warnings)
        if spec is None:
            continue
        grid = [_param_values(spec, k, f) for k in GRID_KEYS]
        for point in itertools.product(*grid):
            points.setdefault(point, f.name)
    return points


_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
# the recipe: what a student run's numbers depend on (the study is the one the report reads)
_IDENTITY = {f.name: f.metadata.get("identity", True) for f in dataclasses.fields(DistillConfig)
             if f.metadata.get("identity", True) is not False and f.name != names.STUDY}


def _allowed(spec: dict) -> dict[str, list]:
    """Identity key -> the values a grid spec lets it take (a key it leaves out: DistillConfig's default)."""
    allowed: dict[str, list] = {k: [_CONFIG_DEFAULTS[k]] for k in _IDENTITY}
    for key, p in (spec.get("parameters") or {}).items():
        if key not in allowed:
            continue  # where a run is written, how it is resumed or cached: not what it computes
        if isinstance(p, dict) and isinstance(p.get("values"), list):
            allowed[key] = p["values"]
        elif isinstance(p, dict) and "value" in p:
            allowed[key] = [p["value"]]
    return allowed


def _compared(key: str, config: dict) -> bool:
    """Whether ``key`` is part of this run's identity (a field whose rule depends on the config, such as the pool,
    which a real-only run does not depend on)."""
    rule = _IDENTITY[key]
    if not callable(rule):
        return True
    try:
        return bool(rule(SimpleNamespace(**{**_CONFIG_DEFAULTS, **config})))
    except (TypeError, ValueError):  # a value of another type than the field's: compared, and refused there
        return True


def _same(value, want) -> bool:
    numeric = (int, float)
    if isinstance(value, bool) or isinstance(want, bool):
        return value is want or str(value).lower() == str(want).lower()
    if isinstance(value, numeric) and isinstance(want, numeric):
        return math.isclose(float(value), float(want), rel_tol=1e-9, abs_tol=1e-12)
    return value == want


def _resolved(key: str, values: list) -> list:
    """The values a setting may hold in a run's record: an ``auto`` precision is what it resolves to on CUDA or
    elsewhere (runs record the resolved value), ``fp32`` is recorded as ``no``."""
    if key != "mixed_precision":
        return values
    from kd.config import precision

    return sorted({precision(str(v), cuda) for v in values for cuda in (True, False)})


def _holds(run: Run, allowed: dict[str, list]) -> bool:
    for key, values in allowed.items():
        if not _compared(key, run.config):
            continue
        value = run.config.get(key, _CONFIG_DEFAULTS[key])
        if key == "mixed_precision":
            from kd.config import precision

            value = precision(str(value), False)  # fp32 and no are one setting
        if not any(_same(value, v) for v in _resolved(key, values)):
            return False
    return True


def split_by_grid(runs: list[Run], path: str | Path, study: str) -> tuple[list[Run], list[Run]]:
    """(the runs whose config is a point of one of the study's student grid specs in ``path``, the others); with
    no student grid spec of the study there, every run counts."""
    specs = [spec for f in spec_files(Path(path)) if (spec := _student_grid(f, study, [])) is not None]
    if not specs:
        return runs, []
    grids = [_allowed(spec) for spec in specs]
    inside = [r for r in runs if any(_holds(r, g) for g in grids)]
    return inside, [r for r in runs if not any(_holds(r, g) for g in grids)]


def check_grid(students: list[Run], groups: list[Group], args, warnings: list[str]) -> list[str]:
    """Warn once per expected grid point without a finished run; returns those warnings."""
    missing = []
    if args.expect:
        have = {tuple(axis_values(r)[k] for k in GRID_KEYS) for r in students}
        expected = expected_from_specs(args.expect, args.study, warnings)
        per_spec: dict[str, list] = {}
        for point, src in sorted(expected.items(), key=str):
            per_spec.setdefault(src, []).append(point)
        for src, points in per_spec.items():
            if len(points) > 1 and not any(p in have for p in points):  # a spec not run yet: one line
                missing.append(f"missing grid ({src}): none of its {len(points)} grid points has a finished run "
                               f"(not run yet? python -m kd.sweep on it)")
                continue
            for point in points:
                if point not in have:
                    values = dict(zip(GRID_KEYS, point))
                    text = point_text(values, trial=values[TRIAL])
                    missing.append(f"missing grid point ({src}): no finished run with {text}")
    if not args.expect or args.expect_paper_grid:
        several = len(sources(groups)) > 1
        for facet in facets(groups):
            mine = in_facet(groups, facet)
            have = {(g.ensemble_size, g.synthetic_ratio, g.temperature, g.synthetic_source) for g in mine}
            points = expected_default(mine, args.expect_paper_grid)
            for point, fig in sorted(points.items(), key=lambda kv: (*kv[0][:3], kv[0][3] or "")):
                if point not in have:
                    values = {**dict(facet), "ensemble_size": point[0], "synthetic_ratio": point[1],
                              "temperature": point[2]}
                    text = point_text(values, source=point[3] if several else None)
                    missing.append(f"missing grid point ({fig}): no finished run with {text}")
    for msg in missing:
        warn(warnings, msg)
    return missing
