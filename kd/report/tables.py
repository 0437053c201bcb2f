"""The terminal table and ``results.csv``: one row per group (grid point without the trial).

The columns of the grid are the group axes (:data:`kd.config.GROUP_AXES`): the CSV has every one, the table the
paper's and any other that a group holds at a value other than its default. The CSV has a ``synthetic_source``
column (empty for real-only, ratio-0 rows, which every generator shares) and the pool's ``synthetic_fid`` (empty
when unknown); the table shows the source only when the study uses more than one.
"""

from __future__ import annotations

import csv
import io

from kd import names
from kd.config import GROUP_AXES
from kd.report.aggregate import LABELS, METRICS, PERCENT, Group, sources, stats
from kd.report.runs import Run

STATS = ("mean", "std", "min", "max", "n")


def fmt(x, pct: bool) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}" if pct else f"{x:.4f}"


def shown_axes(groups: list[Group]) -> list:
    """The paper's axes, and any axis added since that some group holds at a value other than its default."""
    return [a for a in GROUP_AXES if a.named == "always" or any(g.get(a.key) != a.default for g in groups)]


def table(groups: list[Group], teachers: list[Run]) -> str:
    several = len(sources(groups)) > 1
    axes = shown_axes(groups)
    head = [a.label for a in axes] + [*(["source"] if several else []), "+synth", "n"]
    head += [LABELS[k] + (" %" if k in PERCENT else "") for k in METRICS]
    rows = [head]
    for g in groups:
        row = [a.text(g.get(a.key)) for a in axes]
        row += [g.synthetic_source or "(real)"] if several else []
        row += ["-" if g.n_synthetic is None else str(g.n_synthetic), str(len(g.runs))]
        for k in METRICS:
            s, pct = g.stats[k], k in PERCENT
            row.append(fmt(s["mean"], pct) + ("" if s["std"] is None else " ± " + fmt(s["std"], pct)))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("(mean ± std over trials; m = teachers in the ensemble, ratio = synthetic:real images, tau = the "
                 "distillation temperature)")
    acc = stats([float(v) for t in teachers if isinstance(v := t.value(names.TEST_ACC), (int, float))])
    if teachers:
        lines.append(f"teacher runs: {len(teachers)} finished, test acc mean {fmt(acc['mean'], True)} % "
                     f"(min {fmt(acc['min'], True)}, max {fmt(acc['max'], True)})")
    return "\n".join(lines)


def results_csv(groups: list[Group], study: str, dataset: str, arch: str) -> str:
    cols = ["study", "dataset", "arch", *(a.key for a in GROUP_AXES), "synthetic_source", "synthetic_fid",
            "synthetic_fid_authors", "n_runs", "n_real", "n_synthetic"]
    for k in METRICS:
        cols += [f"{k.replace('/', '_')}_{s}" for s in STATS]
    cols.append("run_ids")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for g in groups:
        row = [study, dataset, arch, *(g.get(a.key) for a in GROUP_AXES), g.synthetic_source, g.synthetic_fid,
               g.synthetic_fid_authors, len(g.runs), g.n_real, g.n_synthetic]
        for k in METRICS:
            row += [g.stats[k][s] for s in STATS]
        row.append(" ".join(r.id for r in g.runs))
        w.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
    return buf.getvalue()
