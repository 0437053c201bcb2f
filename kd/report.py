"""The study's runs -> the paper's two figures, a CSV, a terminal table and (``--publish``) a W&B Report.

    python -m kd.report --study=demo                 # offline runs under ./wandb (or $WANDB_DIR/wandb)
    python -m kd.report --study=demo --expect=sweeps/demo   # also warn about grid points without runs
    python -m kd.report --study=cifar10 --online --entity=me --project=kd-fidelity --publish

Where the runs come from:
* offline (the default without a W&B login, see :func:`kd.tracking.wandb_mode`): every
  ``offline-run-*`` folder is read with W&B's own reader, ``wandb leet inspect --summary --json`` (config,
  summary, start time, run id) and ``wandb leet inspect --json`` (history records). Folders that share a run
  id (a resumed run) are merged in start-time order; a step logged twice keeps its last row. A folder that
  cannot be read stops the report with its name. What was read is cached per ``.wandb`` file (size and
  mtime) in ``.cache/report/offline-inspect.json``; ``--refresh`` ignores the cache.
* online: ``wandb.Api().runs(entity/project, filters={"config.study": study})``, cached in
  ``.cache/report/<entity>-<project>-<study>.json`` until ``--refresh``.

Only runs whose summary has ``final`` = True count; the others are named in a warning. Students are grouped
by (ensemble_size, synthetic_ratio, temperature); each group reports n, mean, std (n - 1 in the
denominator), min and max over trials of every metric in :data:`METRICS`. Outputs, each written atomically:
``<out>/fig1.png`` (agreement and accuracy vs synthetic data, 1 and 3 teachers), ``<out>/fig2.png``
(accuracy and agreement vs teacher-ensemble size, one line per temperature) and ``<out>/results.csv``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kd.errors import ArgumentParser, KDError, check_name
from kd.io import atomic_write, read_json, write_json
from kd.wandb_runs import wandb_mode

METRICS = ("test/acc", "test/agreement", "test/kl", "test/ece", "teacher/test_acc")
PERCENT = {"test/acc", "test/agreement", "test/ece", "teacher/test_acc"}  # fractions shown as %
LABELS = {"test/acc": "student acc", "test/agreement": "agreement", "test/kl": "KL (nats)",
          "test/ece": "ECE", "teacher/test_acc": "teacher acc"}
PAPER_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
FIG1_SIZES = (1, 3)  # panel (a) self-distillation, panel (b) 3-teacher ensemble
GRID_KEYS = ("ensemble_size", "synthetic_ratio", "temperature", "trial")
DEFAULTS = {"ensemble_size": 1, "synthetic_ratio": 0.0, "temperature": 1.0, "trial": 0}  # DistillConfig's
DEFAULT_PROJECT = "kd-fidelity"
CACHE_VERSION = 1
BAND = "min–max over trials"


def _warn(warnings: list[str], msg: str) -> None:
    warnings.append(msg)
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _r(x) -> float:
    """Grid coordinates compare after rounding (0.5 from YAML == 0.5 from a run config)."""
    return round(float(x), 6)


# ============================================================================================ runs
@dataclass
class Run:
    """One W&B run (all its offline folders merged); ``sources`` are the folders in time order, or a URL."""

    id: str
    name: str
    config: dict
    summary: dict
    history: list[dict] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @property
    def job(self) -> str | None:
        return self.config.get("job")

    @property
    def finished(self) -> bool:
        return self.summary.get("final") is True

    @property
    def label(self) -> str:
        return f"{self.name} ({self.id})"

    def value(self, key: str):
        """Final value of ``key``: the summary, else the last history row holding it, else None."""
        if key in self.summary:
            return self.summary[key]
        for row in reversed(self.history):
            if key in row:
                return row[key]
        return None


def _clean(d: dict | None) -> dict:
    return {k: v for k, v in (d or {}).items() if not str(k).startswith("_")}


def wandb_exe() -> str:
    """The `wandb` CLI of this interpreter's environment (beside sys.executable), else the one on PATH."""
    exe = Path(sys.executable).with_name("wandb")
    if exe.exists():
        return str(exe)
    found = shutil.which("wandb")
    if not found:
        raise KDError(f"the `wandb` command is not installed beside {sys.executable}: pip install wandb")
    return found


def offline_folders(wandb_dir: str | Path) -> list[Path]:
    """``offline-run-*`` folders under ``DIR/wandb`` (or ``DIR`` itself when it is the wandb folder)."""
    root = Path(wandb_dir)
    base = root / "wandb" if (root / "wandb").is_dir() else root
    return sorted(p for p in base.glob("offline-run-*") if p.is_dir())


def _transaction_log(folder: Path) -> Path:
    logs = sorted(folder.glob("run-*.wandb"))
    if len(logs) != 1:
        raise KDError(f"cannot read W&B run folder {folder}: expected one run-*.wandb transaction log, "
                      f"found {len(logs)}; remove the folder if it is debris")
    return logs[0]


def leet_inspect(folder: Path, summary: bool) -> str:
    cmd = [wandb_exe(), "leet", "inspect", "--json", *(["--summary"] if summary else []),
           str(_transaction_log(folder))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    except subprocess.TimeoutExpired:
        raise KDError(f"cannot read W&B run folder {folder}: `wandb leet inspect` took over 600 s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        raise KDError(f"cannot read W&B run folder {folder}: `wandb leet inspect` failed: {why[:300]}")
    return proc.stdout


def inspect_summary(folder: Path) -> dict:
    """``wandb leet inspect --summary --json``: one object with run_id, name, start_time, config, summary."""
    out = leet_inspect(folder, summary=True)
    try:
        obj = json.loads(out)
    except json.JSONDecodeError as e:
        raise KDError(f"cannot read W&B run folder {folder}: `wandb leet inspect --summary --json` printed "
                      f"no JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not obj.get("run_id"):
        raise KDError(f"cannot read W&B run folder {folder}: its summary names no run_id")
    return {k: obj.get(k) for k in ("run_id", "name", "start_time", "state", "config", "summary")}


def inspect_history(folder: Path) -> list[dict]:
    """History rows of ``wandb leet inspect --json`` (records of type "history"), each with ``_step``."""
    rows = []
    for n, line in enumerate(leet_inspect(folder, summary=False).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise KDError(f"cannot read W&B run folder {folder}: record {n} is not JSON ({e.msg})") from None
        if rec.get("type") != "history":
            continue
        hist = rec.get("history", {})
        item = hist.get("item", {})
        step = item.get("_step", hist.get("step", {}).get("num", 0))
        rows.append({**_clean(item), "_step": int(step)})
    return rows


def _time_key(start_time: str | None, folder: Path) -> tuple:
    """Sort key from an RFC 3339 start time (fraction padded to ns), the folder name breaking ties."""
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?", start_time or "")
    if not m:
        return ("", folder.name)
    return (m.group(1) + "." + (m.group(2) or "").ljust(9, "0")[:9], folder.name)


class InspectCache:
    """What `wandb leet inspect` said about each .wandb file, reused while the file's size and mtime stay."""

    def __init__(self, path: Path | None, refresh: bool, warnings: list[str]):
        self.path, self.entries, self.dirty = path, {}, False
        if path is None or refresh or not path.exists():
            return
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            _warn(warnings, f"ignoring unreadable cache {path} ({e}); reading every run folder again")
            return
        if isinstance(data, dict) and data.get("version") == CACHE_VERSION:
            self.entries = data.get("entries", {})

    @staticmethod
    def _stamp(folder: Path) -> tuple[str, list[int]]:
        log = _transaction_log(folder)
        st = log.stat()
        return str(log.resolve()), [st.st_size, st.st_mtime_ns]

    def get(self, folder: Path, what: str):
        key, stamp = self._stamp(folder)
        entry = self.entries.get(key)
        if entry and entry.get("stamp") == stamp and what in entry:
            return entry[what]
        return None

    def put(self, folder: Path, what: str, value) -> None:
        key, stamp = self._stamp(folder)
        entry = self.entries.get(key)
        if not entry or entry.get("stamp") != stamp:
            entry = self.entries[key] = {"stamp": stamp}
        entry[what] = value
        self.dirty = True

    def save(self) -> None:
        if self.path is not None and self.dirty:
            self.entries = {k: v for k, v in self.entries.items() if Path(k).exists()}  # drop deleted runs
            write_json(self.path, {"version": CACHE_VERSION, "entries": self.entries})


def _inspect_all(folders: list[Path], what: str, cache: InspectCache) -> dict[Path, object]:
    fn = inspect_summary if what == "summary" else inspect_history
    out, todo = {}, []
    for f in folders:
        hit = cache.get(f, what)
        if hit is None:
            todo.append(f)
        else:
            out[f] = hit
    if todo:
        workers = max(1, min(len(todo), 2 * (os.cpu_count() or 1), 8))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for f, value in zip(todo, pool.map(fn, todo)):  # the first error propagates, naming its folder
                cache.put(f, what, value)
                out[f] = value
    return out


def read_offline(study: str, wandb_dir: str | Path, cache: InspectCache) -> list[Run]:
    """Every run of ``study`` under ``wandb_dir``, resumed folders merged (history read for finished runs)."""
    folders = offline_folders(wandb_dir)
    summaries = _inspect_all(folders, "summary", cache)
    by_id: dict[str, list[Path]] = {}
    for f in folders:
        by_id.setdefault(summaries[f]["run_id"], []).append(f)
    runs, need_history = [], []
    for run_id, parts in sorted(by_id.items()):
        parts.sort(key=lambda f: _time_key(summaries[f].get("start_time"), f))
        config, summary, name = {}, {}, run_id
        for f in parts:
            s = summaries[f]
            config.update(_clean(s.get("config")))
            summary.update(_clean(s.get("summary")))
            name = s.get("name") or name
        if config.get("study") != study:
            continue
        run = Run(id=run_id, name=name, config=config, summary=summary, sources=[str(f) for f in parts])
        runs.append(run)
        if run.finished and run.job == "student":  # teachers: the summary is all the report uses
            need_history.extend(parts)
    histories = _inspect_all(need_history, "history", cache)
    for run in runs:
        if run.finished and run.job == "student":
            merged: dict[int, dict] = {}
            for f in run.sources:
                for row in histories[Path(f)]:
                    merged[row["_step"]] = row  # a step logged again (a resume) keeps its last row
            run.history = [merged[s] for s in sorted(merged)]
    return runs


def _default_entity() -> str | None:
    import wandb

    try:
        return wandb.Api(timeout=60).default_entity
    except (wandb.errors.Error, ValueError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise KDError(f"W&B API: cannot find your default entity ({why}): pass --entity=NAME") from None


def _plain(v):
    """JSON-safe copy of a value from the W&B API (nested dict-likes become dicts)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "items"):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def read_online(study: str, entity: str, project: str, cache_path: Path,
                refresh: bool) -> tuple[list[Run], str]:
    """Runs of ``study`` from the W&B API, cached as JSON (atomically) until ``refresh``."""
    if cache_path.exists() and not refresh:
        data = read_json(cache_path)
        runs = [Run(**r) for r in data["runs"]]
        when = data.get("pulled_at", "?")
        return runs, f"using runs pulled {when} from {cache_path} (--refresh pulls again)"
    import datetime

    import wandb

    try:
        api = wandb.Api(timeout=60)
        runs = []
        for r in api.runs(f"{entity}/{project}", filters={"config.study": study}, per_page=200):
            config = _clean(_plain(dict(r.config)))
            summary = {k: _plain(r.summary.get(k)) for k in r.summary.keys() if not k.startswith("_")}
            run = Run(id=r.id, name=r.name or r.id, config=config, summary=summary, sources=[r.url])
            if run.finished and run.job == "student":
                keys = ["_step", "epoch", "test/acc", "test/agreement"]
                for row in r.scan_history(keys=keys, page_size=1000):
                    row = _plain(dict(row))
                    row["_step"] = int(row.get("_step", row.get("epoch", 0)))
                    run.history.append(row)
            runs.append(run)
    except (wandb.errors.Error, ValueError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise KDError(f"W&B API: cannot list the runs of {entity}/{project}: {why}") from None
    if runs:
        pulled = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_json(cache_path, {"entity": entity, "project": project, "study": study, "pulled_at": pulled,
                                "runs": [asdict(r) for r in runs]})
    return runs, f"pulled {len(runs)} runs of study {study} from {entity}/{project}"


# ============================================================================================ grouping
def student_key(run: Run) -> tuple[int, float, float]:
    """(ensemble_size, synthetic_ratio, temperature); the size is the number of teachers actually used."""
    c = run.config
    names = c.get("teacher_names")
    try:
        m = len(names) if isinstance(names, list) and names else int(c["ensemble_size"])
        return m, _r(c["synthetic_ratio"]), _r(c["temperature"])
    except (KeyError, TypeError, ValueError) as e:
        raise KDError(f"student run {run.label} ({run.sources[0] if run.sources else '?'}) has no usable "
                      f"ensemble_size / synthetic_ratio / temperature in its config ({e!r})") from None


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

    @property
    def key(self) -> tuple[int, float, float]:
        return self.ensemble_size, self.synthetic_ratio, self.temperature


def _count(runs: list[Run], key: str, what: str, warnings: list[str]) -> int | None:
    vals = sorted({int(v) for r in runs if (v := r.value(key)) is not None})
    if len(vals) > 1:
        _warn(warnings, f"{what}: runs disagree on {key} ({', '.join(map(str, vals))}); showing the median")
    return vals[len(vals) // 2] if vals else None


def group_students(students: list[Run], warnings: list[str]) -> list[Group]:
    by_key: dict[tuple, list[Run]] = {}
    for run in students:
        by_key.setdefault(student_key(run), []).append(run)
    groups = []
    for key in sorted(by_key):
        runs = sorted(by_key[key], key=lambda r: (r.config.get("trial", 0), r.id))
        what = _point(*key)
        per_metric = {}
        for metric in METRICS:
            vals = [float(v) for r in runs if isinstance(v := r.value(metric), (int, float))]
            per_metric[metric] = stats(vals)
            if 0 < len(vals) < len(runs):
                lacking = [r.label for r in runs if not isinstance(r.value(metric), (int, float))]
                _warn(warnings, f"{what}: {metric} missing in {', '.join(lacking)}")
            if any(not math.isfinite(v) for v in vals):
                _warn(warnings, f"{what}: {metric} is not finite in some runs; its mean is NaN")
        groups.append(Group(*key, runs=runs, stats=per_metric,
                            n_real=_count(runs, "data/n_real", what, warnings),
                            n_synthetic=_count(runs, "data/n_synthetic", what, warnings)))
    return groups


def _point(m, r, t, trial=None) -> str:
    s = f"ensemble_size={m} synthetic_ratio={r:g} temperature={t:g}"
    return s if trial is None else f"{s} trial={trial}"


def _only(values: set, what: str, study: str) -> str:
    if len(values) > 1:
        raise KDError(f"study {study} mixes {what}s ({', '.join(sorted(map(str, values)))}): one study per "
                      f"{what}, so that each figure compares like with like")
    return str(next(iter(values))) if values else "?"


def fig1_temperature(groups: list[Group]) -> float | None:
    temps = sorted({g.temperature for g in groups if g.ensemble_size in FIG1_SIZES})
    if not temps:
        return None
    return 1.0 if 1.0 in temps else temps[0]


# ============================================================================================ grid checks
def expected_default(groups: list[Group], paper_grid: bool) -> dict[tuple, str]:
    """Fig 1: sizes {1, 3} x ratios present (+ the paper's); fig 2: sizes x temperatures at ratio 0."""
    points: dict[tuple, str] = {}
    tau = fig1_temperature(groups)
    tau = 1.0 if tau is None else tau
    ratios = {g.synthetic_ratio for g in groups} | (set(map(_r, PAPER_RATIOS)) if paper_grid else set())
    for m, r in itertools.product(FIG1_SIZES, sorted(ratios)):
        points[(m, r, tau)] = "fig1"
    at0 = [g for g in groups if g.synthetic_ratio == 0.0]
    sizes, temps = sorted({g.ensemble_size for g in at0}), sorted({g.temperature for g in at0})
    for m, t in itertools.product(sizes, temps):
        points.setdefault((m, 0.0, t), "fig2")
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
        return [int(v) if key in ("ensemble_size", "trial") else _r(v) for v in vals]
    except (TypeError, ValueError):
        raise KDError(f"--expect: {src} parameter {key} has a non-numeric value in {vals!r}") from None


def expected_from_specs(path: str | Path, study: str, warnings: list[str]) -> dict[tuple, str]:
    """(ensemble_size, ratio, temperature, trial) points of the student grid sweeps in a folder (or file)."""
    import yaml

    path = Path(path)
    files = [path] if path.is_file() else sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
    if not path.exists() or not files:
        raise KDError(f"--expect={path}: no sweep specs (*.yaml) there")
    points: dict[tuple, str] = {}
    for f in files:
        try:
            spec = yaml.safe_load(f.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise KDError(f"--expect: cannot read sweep spec {f}: {str(e).splitlines()[0]}") from None
        if not isinstance(spec, dict):
            raise KDError(f"--expect: {f} is not a W&B sweep spec (a YAML mapping)")
        params = spec.get("parameters") or {}
        if "distill" not in str(spec.get("program", "")) and not set(params) & set(DEFAULTS):
            continue  # a teacher sweep
        named = (params.get("study") or {}).get("value") if isinstance(params.get("study"), dict) else None
        if named is not None and str(named) != study:
            _warn(warnings, f"--expect: {f} is a sweep of study {named}, not {study}; not checked")
            continue
        if spec.get("method", "grid") != "grid":
            _warn(warnings, f"--expect: {f} is a {spec.get('method')} sweep, not a grid; not checked")
            continue
        grid = [_param_values(spec, k, f) for k in GRID_KEYS]
        for point in itertools.product(*grid):
            points.setdefault(point, f.name)
    return points


def check_grid(students: list[Run], groups: list[Group], args, warnings: list[str]) -> list[str]:
    """Warn once per expected grid point without a finished run; returns those warnings."""
    missing = []
    if args.expect:
        have = {(*student_key(r), int(r.config.get("trial", 0))) for r in students}
        for point, src in sorted(expected_from_specs(args.expect, args.study, warnings).items()):
            if point not in have:
                missing.append(f"missing grid point ({src}): no finished run with {_point(*point)}")
    if not args.expect or args.expect_paper_grid:
        have = {g.key for g in groups}
        for point, fig in sorted(expected_default(groups, args.expect_paper_grid).items()):
            if point not in have:
                missing.append(f"missing grid point ({fig}): no finished run with {_point(*point)}")
    for msg in missing:
        _warn(warnings, msg)
    return missing


# ============================================================================================ outputs
def _fmt(x, pct: bool) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}" if pct else f"{x:.4f}"


def table(groups: list[Group], teachers: list[Run]) -> str:
    head = ["m", "ratio", "tau", "+synth", "n"]
    head += [LABELS[k] + (" %" if k in PERCENT else "") for k in METRICS]
    rows = [head]
    for g in groups:
        row = [str(g.ensemble_size), f"{g.synthetic_ratio:g}", f"{g.temperature:g}",
               "-" if g.n_synthetic is None else str(g.n_synthetic), str(len(g.runs))]
        for k in METRICS:
            s, pct = g.stats[k], k in PERCENT
            row.append(_fmt(s["mean"], pct) + ("" if s["std"] is None else " ± " + _fmt(s["std"], pct)))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("(mean ± std over trials; m = teachers in the ensemble, ratio = synthetic:real images)")
    acc = stats([float(v) for t in teachers if isinstance(v := t.value("test/acc"), (int, float))])
    if teachers:
        lines.append(f"teacher runs: {len(teachers)} finished, test acc mean {_fmt(acc['mean'], True)} % "
                     f"(min {_fmt(acc['min'], True)}, max {_fmt(acc['max'], True)})")
    return "\n".join(lines)


def results_csv(groups: list[Group], study: str, dataset: str, arch: str) -> str:
    cols = ["study", "dataset", "arch", "ensemble_size", "synthetic_ratio", "temperature", "n_runs",
            "n_real", "n_synthetic"]
    for k in METRICS:
        cols += [f"{k.replace('/', '_')}_{s}" for s in ("mean", "std", "min", "max", "n")]
    cols.append("run_ids")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for g in groups:
        row = [study, dataset, arch, g.ensemble_size, g.synthetic_ratio, g.temperature, len(g.runs),
               g.n_real, g.n_synthetic]
        for k in METRICS:
            row += [g.stats[k][s] for s in ("mean", "std", "min", "max", "n")]
        row.append(" ".join(r.id for r in g.runs))
        w.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
    return buf.getvalue()


def x_label(g: Group) -> str:
    """Figure 1's categories: 'real only', '+12.5k' (thousands from 10k up), '+719' (exact below)."""
    if g.synthetic_ratio == 0:
        return "real only"
    n = g.n_synthetic
    if n is None:
        return f"ratio {g.synthetic_ratio:g}"
    if n >= 10_000:
        return f"+{n / 1000:.1f}".rstrip("0").rstrip(".") + "k"
    return f"+{n}"


def _band(ax, x, groups: list[Group | None], metric: str, color, **kw):
    """Mean line with a min–max band over trials; a None group (no runs) is skipped (labelled elsewhere)."""
    pts = [(xi, g.stats[metric]) for xi, g in zip(x, groups) if g is not None and g.stats[metric]["n"]]
    x = [xi for xi, _ in pts]
    mean, lo, hi = ([_pct(s[k]) for _, s in pts] for k in ("mean", "min", "max"))
    marker = kw.pop("marker", "o")
    if len(pts) == 1 and not marker:  # a lone point of a marker-less line: a short horizontal dash
        marker, kw["markersize"] = "_", 28
    (line,) = ax.plot(x, mean, color=color, marker=marker, **kw)
    if any(s["n"] > 1 for _, s in pts):
        if len(pts) == 1:  # a band needs two points: show the range as an error bar
            ax.errorbar(x, mean, yerr=[[mean[0] - lo[0]], [hi[0] - mean[0]]], color=color, capsize=4,
                        alpha=0.5)
        else:
            ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)
    return line


def _pct(v):
    return math.nan if v is None else 100 * v


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _trials(groups: list[Group]) -> str:
    ns = sorted({len(g.runs) for g in groups})
    return "-" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"


def figure1(groups: list[Group], study: str, dataset: str, arch: str):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    tau = fig1_temperature(groups)
    fig = Figure(figsize=(12.5, 5.8))  # laid out by hand: a shared legend sits between title and panels
    axes = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.065, right=0.935, top=0.79, bottom=0.2, wspace=0.42)
    titles = {1: "(a) Self-distillation: 1 teacher", 3: "(b) Ensemble distillation: 3 teachers"}
    at_tau = [g for g in groups if g.ensemble_size in FIG1_SIZES and g.temperature == tau]
    ratios = sorted({g.synthetic_ratio for g in at_tau})  # the same categories in both panels
    labels = {g.synthetic_ratio: f"{x_label(g)}\n(ratio {g.synthetic_ratio:g})" for g in at_tau}
    x = list(range(len(ratios)))
    drawn = False
    for ax, m in zip(axes, FIG1_SIZES):
        ax.set_title(titles[m], fontsize=12)
        by_ratio = {g.synthetic_ratio: g for g in at_tau if g.ensemble_size == m}
        if not by_ratio:
            _empty(ax, f"no finished student runs with ensemble_size={m}" + (f", τ={tau:g}" if tau else ""))
            continue
        gs = [by_ratio.get(r) for r in ratios]  # None: a grid point without runs (a gap in the lines)
        right = ax.twinx()
        _band(ax, x, gs, "test/agreement", "tab:blue")
        _band(right, x, gs, "test/acc", "tab:orange")
        _band(right, x, gs, "teacher/test_acc", "0.25", linestyle="--", marker="")
        drawn = True
        for xi, g in zip(x, gs):
            if g is None:
                ax.text(xi, 0.03, "no runs", transform=ax.get_xaxis_transform(), ha="center", fontsize=8.5,
                        color="0.35", style="italic")
        ax.set_xticks(x, [labels[r] for r in ratios])
        ax.set_xlim(-0.3, len(ratios) - 0.7)
        ax.set_xlabel("distillation data: real training set + synthetic images")
        ax.set_ylabel("test agreement with teacher (%)", color="tab:blue")
        right.set_ylabel("test accuracy (%)", color="tab:orange")
        ax.tick_params(axis="y", colors="tab:blue")
        right.tick_params(axis="y", colors="tab:orange")
        ax.grid(True, alpha=0.3)
    fig.suptitle("Fidelity vs generalization as synthetic data is added to distillation", fontsize=13, y=0.99)
    if drawn:
        handles = [Line2D([], [], color="tab:blue", marker="o", label="test agreement (left axis)"),
                   Line2D([], [], color="tab:orange", marker="o", label="student test accuracy (right axis)"),
                   Line2D([], [], color="0.25", linestyle="--", label="teacher test accuracy (right axis)")]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.945),
                   ncol=3, fontsize=9.5, title=f"lines: mean over trials; shaded: {BAND}", title_fontsize=9,
                   frameon=False)
    tau_txt = "-" if tau is None else f"{tau:g}"
    fig.text(0.5, 0.01, f"study {study} · dataset {dataset} · student {arch} · temperature τ = {tau_txt} · "
             f"trials per point: {_trials(at_tau)} · metrics on the test set after the last epoch",
             ha="center", va="bottom", fontsize=9, color="0.3")
    return fig


def figure2(groups: list[Group], study: str, dataset: str, arch: str):
    from matplotlib.figure import Figure

    at0 = [g for g in groups if g.synthetic_ratio == 0.0]
    temps = sorted({g.temperature for g in at0})
    fig = Figure(figsize=(12.5, 5.0), layout="constrained")
    ax_acc, ax_agr = fig.subplots(1, 2)
    ax_acc.set_title("(a) Teacher and student accuracy vs ensemble size", fontsize=12)
    ax_agr.set_title("(b) Student–teacher agreement vs ensemble size", fontsize=12)
    if not at0:
        for ax in (ax_acc, ax_agr):
            _empty(ax, "no finished student runs with synthetic_ratio=0")
    else:
        colors = ["tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown"]
        sizes = sorted({g.ensemble_size for g in at0})
        teacher = _teacher_groups(at0)
        _band(ax_acc, [g.ensemble_size for g in teacher], teacher, "teacher/test_acc", "0.25", linestyle="--",
              marker="s", label="teacher (ensemble) accuracy")
        for i, t in enumerate(temps):
            gs = sorted((g for g in at0 if g.temperature == t), key=lambda g: g.ensemble_size)
            c = colors[i % len(colors)]
            xs = [g.ensemble_size for g in gs]
            _band(ax_acc, xs, gs, "test/acc", c, label=f"student, τ = {t:g}")
            _band(ax_agr, xs, gs, "test/agreement", c, label=f"τ = {t:g}")
        for ax, ylabel in ((ax_acc, "test accuracy (%)"), (ax_agr, "test agreement with teacher (%)")):
            ax.set_xticks(sizes)
            ax.set_xlabel("teacher ensemble size m (number of teachers)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(loc="best", fontsize=9, title=f"lines: mean over trials; shaded: {BAND}",
                      title_fontsize=8.5)
    fig.suptitle("Does a bigger teacher ensemble give a better or a more faithful student?", fontsize=13)
    fig.text(0.5, -0.02, f"study {study} · dataset {dataset} · student {arch} · real data only "
             f"(synthetic_ratio 0) · trials per point: {_trials(at0)} · one line per distillation "
             "temperature τ",
             ha="center", va="top", fontsize=9, color="0.3")
    return fig


def _teacher_groups(at0: list[Group]) -> list[Group]:
    """Teacher accuracy per ensemble size, pooled over temperatures, each teacher ensemble counted once."""
    out = []
    for m in sorted({g.ensemble_size for g in at0}):
        seen: dict[tuple, float] = {}
        for g in at0:
            if g.ensemble_size != m:
                continue
            for r in g.runs:
                v = r.value("teacher/test_acc")
                if isinstance(v, (int, float)):
                    who = tuple(r.config.get("teacher_hashes") or r.config.get("teacher_names") or
                                [f"trial{r.config.get('trial')}"])
                    seen[who] = float(v)
        out.append(Group(m, 0.0, 0.0, runs=[], stats={"teacher/test_acc": stats(list(seen.values()))},
                         n_real=None, n_synthetic=None))
    return out


def save_figure(fig, path: Path) -> None:
    """Render to a temp file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=path.suffix.lstrip("."))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ============================================================================================ W&B Report
def build_report(entity: str, project: str, study: str, dataset: str, arch: str, groups: list[Group],
                 n_teachers: int, figures_run_id: str | None, table_md: str):
    """The W&B Report: text, the two figures (media of the run that logged them) and live panels."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    n_students = sum(len(g.runs) for g in groups)
    intro = (
        f"Reproduction of Stanton et al. 2021, *Does Knowledge Distillation Really Work?*, study `{study}` "
        f"({dataset}, student {arch}): {n_students} finished student runs in {len(groups)} grid points, "
        f"{n_teachers} teacher runs. **Agreement** is the share of test images where student and teacher "
        f"predict the same class (fidelity); **accuracy** is generalization. Figures show the mean over "
        f"trials with a {BAND} band. Made with `python -m kd.report --study={study} --publish`."
    )
    blocks = [wr.MarkdownBlock(text=intro), wr.H2(text="Figure 1: adding synthetic distillation data")]
    if figures_run_id:
        figs = wr.Runset(entity=entity, project=project, name="report figures",
                         filters=expr.And(expr.Metric("ID") == figures_run_id))
        blocks.append(wr.PanelGrid(runsets=[figs], panels=[
            wr.MediaBrowser(title="Figure 1", media_keys=["figures/fig1"], layout=wr.Layout(w=24, h=12))]))
    blocks.append(wr.H2(text="Figure 2: teacher-ensemble size"))
    if figures_run_id:
        blocks.append(wr.PanelGrid(runsets=[figs], panels=[
            wr.MediaBrowser(title="Figure 2", media_keys=["figures/fig2"], layout=wr.Layout(w=24, h=12))]))
    students = wr.Runset(entity=entity, project=project, name=f"students of study {study}",
                         filters=expr.And(expr.Config("study") == study, expr.Config("job") == "student"),
                         groupby=["config.ensemble_size", "config.synthetic_ratio", "config.temperature"])
    blocks += [
        wr.H2(text="Live panels (all student runs of the study)"),
        wr.PanelGrid(runsets=[students], panels=[
            wr.LinePlot(title="test agreement over epochs", x="epoch", y=["test/agreement"],
                        layout=wr.Layout(x=0, y=0, w=12, h=8)),
            wr.LinePlot(title="student test accuracy over epochs", x="epoch", y=["test/acc"],
                        layout=wr.Layout(x=12, y=0, w=12, h=8)),
            wr.ScatterPlot(title="final test agreement vs ensemble size", x=wr.Config("ensemble_size"),
                           y=wr.SummaryMetric("test/agreement"), layout=wr.Layout(x=0, y=8, w=12, h=8)),
            wr.BarPlot(title="final test agreement by grid point (mean, min–max)", metrics=["test/agreement"],
                       groupby_aggfunc="mean", groupby_rangefunc="minmax",
                       layout=wr.Layout(x=12, y=8, w=12, h=8)),
        ]),
        wr.H2(text="Results table"),
        wr.MarkdownBlock(text="```\n" + table_md + "\n```"),
    ]
    return wr.Report(entity=entity, project=project, title=f"Does KD really work? study {study}"[:128],
                     description=f"{dataset}, {n_students} student runs", blocks=blocks)


def publish(entity: str, project: str, study: str, dataset: str, arch: str, groups: list[Group],
            n_teachers: int, out: Path, table_md: str) -> str:
    import wandb

    run = wandb.init(entity=entity, project=project, mode="online", job_type="report", name=f"report-{study}",
                     config={"study": study, "job": "report"}, settings=wandb.Settings(silent=True))
    try:
        run.log({"figures/fig1": wandb.Image(str(out / "fig1.png")),
                 "figures/fig2": wandb.Image(str(out / "fig2.png"))})
        with open(out / "results.csv", newline="") as fh:
            rows = list(csv.reader(fh))
        run.log({"results": wandb.Table(columns=rows[0], data=rows[1:])})
        run_id = run.id
    finally:
        run.finish()
    report = build_report(entity, project, study, dataset, arch, groups, n_teachers, run_id, table_md)
    report.save()
    return report.url


# ============================================================================================ main
@dataclass
class Result:
    groups: list[Group]
    students: list[Run]
    teachers: list[Run]
    unfinished: list[Run]
    warnings: list[str]
    missing: list[str]
    paths: dict[str, Path]
    table: str
    url: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m kd.report", allow_abbrev=False,
                       description="Figures, a CSV and a W&B Report from the runs of one study.")
    p.add_argument("--study", required=True, help="the --study label the runs were made with")
    p.add_argument("--wandb_dir", "--wandb-dir", default=None,
                   help="folder holding wandb/offline-run-* (default: $WANDB_DIR, else the current folder)")
    p.add_argument("--out", default="figures", help="output folder for fig1.png, fig2.png, results.csv")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--online", dest="mode", action="store_const", const="online",
                      help="read runs through the W&B API (default when logged in)")
    mode.add_argument("--offline", dest="mode", action="store_const", const="offline",
                      help="read offline runs from disk (default without a login)")
    p.add_argument("--entity", default=None, help="online: W&B entity (default: $WANDB_ENTITY or yours)")
    p.add_argument("--project", default=None, help=f"online: W&B project (default: $WANDB_PROJECT or "
                   f"{DEFAULT_PROJECT})")
    p.add_argument("--publish", action="store_true", help="also save a W&B Report (needs `wandb login`)")
    p.add_argument("--refresh", action="store_true", help="ignore the caches in .cache/report")
    p.add_argument("--expect", default=None, metavar="SWEEP_DIR",
                   help="warn about each grid point of the student sweep specs there without a finished run")
    p.add_argument("--expect-paper-grid", "--expect_paper_grid", dest="expect_paper_grid",
                   action="store_true",
                   help="also expect the paper's synthetic ratios 0, 0.25, 0.5, 0.75, 1.0 in Figure 1")
    p.add_argument("--cache_dir", default=".cache/report", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_report(args: argparse.Namespace) -> Result:
    study = check_name(args.study, "study")
    mode = args.mode or ("online" if wandb_mode() == "online" else "offline")
    if args.publish and mode != "online":
        raise KDError("--publish needs a W&B login: run `wandb login` (or set WANDB_API_KEY) and rerun; "
                      "nothing was written")
    warnings: list[str] = []
    cache_dir = Path(args.cache_dir)
    wandb_dir = Path(args.wandb_dir or os.environ.get("WANDB_DIR") or ".")
    inspect_cache = None
    if mode == "online":
        entity = args.entity or os.environ.get("WANDB_ENTITY")
        project = check_name(args.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, "project")
        if not entity:
            entity = _default_entity()
        if not entity:
            raise KDError("no W&B entity: pass --entity=NAME (your user or team)")
        check_name(entity, "entity")
        runs, note = read_online(study, entity, project, cache_dir / f"{entity}-{project}-{study}.json",
                                 args.refresh)
        print(note, file=sys.stderr)
        where = f"online: {entity}/{project}"
    else:
        entity = project = None
        inspect_cache = InspectCache(cache_dir / "offline-inspect.json", args.refresh, warnings)
        runs = read_offline(study, wandb_dir, inspect_cache)
        where = str(wandb_dir.resolve())

    unfinished = [r for r in runs if not r.finished and r.job in ("teacher", "student")]
    if unfinished:
        _warn(warnings, f"{len(unfinished)} run(s) of study {study} not finished (no summary final=True; "
              f"cut off and not yet resumed?), ignored: " + ", ".join(r.label for r in unfinished))
    students = [r for r in runs if r.finished and r.job == "student"]
    teachers = [r for r in runs if r.finished and r.job == "teacher"]
    if not students:
        hint = f" ({len(teachers)} finished teacher runs, but no students)" if teachers else ""
        raise KDError(f"no finished runs for study {study} in {where}{hint}: run the sweeps first, "
                      "see README")
    dataset = _only({str(r.config.get("dataset", "?")) for r in students}, "dataset", study)
    arch = _only({str(r.config.get("arch", "?")) for r in students}, "arch", study)
    groups = group_students(students, warnings)
    missing = check_grid(students, groups, args, warnings)
    text = table(groups, teachers)

    out = Path(args.out)
    paths = {"fig1": out / "fig1.png", "fig2": out / "fig2.png", "csv": out / "results.csv"}
    save_figure(figure1(groups, study, dataset, arch), paths["fig1"])
    save_figure(figure2(groups, study, dataset, arch), paths["fig2"])
    with atomic_write(paths["csv"], "w") as fh:
        fh.write(results_csv(groups, study, dataset, arch))
    if inspect_cache is not None:
        inspect_cache.save()
    print(f"study {study} ({dataset}, {arch}): {len(students)} student runs, {len(teachers)} teacher runs "
          f"from {where}")
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    result = Result(groups, students, teachers, unfinished, warnings, missing, paths, text)
    if args.publish:
        import wandb

        try:
            result.url = publish(entity, project, study, dataset, arch, groups, len(teachers), out, text)
        except (wandb.errors.Error, OSError, ValueError) as e:  # requests' errors are OSErrors
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise KDError(f"--publish failed ({why}); the figures and CSV in {out} are written") from None
        print(f"W&B Report: {result.url}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_report(args)
    except KDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
