"""The study's runs -> the paper's figures, a CSV, a terminal table and (``--publish``) a W&B Report.

    python -m kd.report --study=demo                 # offline runs under ./wandb (or $WANDB_DIR/wandb)
    python -m kd.report --study=demo --expect=sweeps/demo   # also warn about grid points without runs
    python -m kd.report --study=cifar10 --online --entity=me --project=kd-fidelity --publish

Where the runs come from:
* offline (the default without a W&B login, see :func:`kd.wandb_runs.wandb_mode`): every ``offline-run-*``
  folder, read with W&B's own reader (:mod:`kd.report.runs`); resumed folders are merged; a folder that
  cannot be read (a run killed before its first record, a truncated or foreign file) is skipped with one
  warning naming it. Cached per ``.wandb`` file in ``.cache/report/offline-inspect.json``.
* online: the W&B public API, one listing with each run's config and summary (:mod:`kd.report.online`),
  cached in ``.cache/report/<entity>-<project>-<study>.json`` and pulled again as soon as W&B's runs changed.
``--refresh`` ignores both caches.

Only runs whose summary has ``final`` = True count; the others are named in a warning. Each grid point
(dataset, arch, synthetic source, ensemble size, ratio, temperature, trial) counts once: the newest
finished run (:func:`kd.report.aggregate.dedupe`). Students are grouped by (ensemble_size, synthetic_ratio,
temperature, synthetic source); each group reports n, mean, std (n - 1 in the denominator), min and max over
trials of every metric in :data:`METRICS`. Outputs in ``--out`` (default ``figures``), each written
atomically: ``fig1.png`` (agreement and accuracy vs synthetic data, 1 and 3 teachers; with several
synthetic sources also ``fig1-<source>.png`` per other source and ``synthetic_effect.png``), ``fig2.png``
(accuracy and agreement vs teacher-ensemble size) and ``results.csv`` (see :mod:`kd.report.figures`).

Modules: runs (offline reader, :class:`Run`), online (W&B API), aggregate (dedup, groups, stats), grid
(expected points), tables (table, CSV), figures, effect (synthetic_effect.png), wandb_report (``--publish``),
cli (flags, :func:`run_report`, :func:`main`).
"""

from kd.report.aggregate import (
                                 FIG1_SIZES,
                                 LABELS,
                                 METRICS,
                                 PERCENT,
                                 Group,
                                 dedupe,
                                 grid_point,
                                 group_students,
                                 stats,
                                 student_key,
)
from kd.report.cli import Result, main, parse_args, run_report, write_outputs
from kd.report.effect import synthetic_effects
from kd.report.figures import fig1_names, figure1, figure2, save_figure, slug, x_label
from kd.report.grid import check_grid, expected_default, expected_from_specs
from kd.report.online import OnlineCache, read_online
from kd.report.runs import InspectCache, Run, read_offline
from kd.report.tables import results_csv, table
from kd.report.wandb_report import build_report, publish

__all__ = ["FIG1_SIZES", "LABELS", "METRICS", "PERCENT", "Group", "InspectCache", "OnlineCache", "Result", "Run",
           "build_report", "check_grid", "dedupe", "expected_default", "expected_from_specs", "fig1_names",
           "figure1", "figure2", "grid_point", "group_students", "main", "parse_args", "publish", "read_offline",
           "read_online", "results_csv", "run_report", "save_figure", "slug", "stats", "student_key",
           "synthetic_effects", "table", "write_outputs", "x_label"]
