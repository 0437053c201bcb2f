"""``--publish``: the figures and the CSV logged to a ``report`` run, and a W&B Report that shows them.

The Report holds an introduction, each figure as the media of the run that logged it (``figures/<stem>``:
fig1, one fig1-<source> per other synthetic source, fig2 and synthetic_effect when drawn), live panels over
all the study's student runs, and the results table.
"""

from __future__ import annotations

import csv
from pathlib import Path

from kd import names
from kd.report.aggregate import ENSEMBLE_SIZE, SYNTHETIC_RATIO, TEMPERATURE, Group
from kd.report.figures import BAND

FIGURES = ("fig1", "fig2")


def _title(stem: str) -> str:
    if stem.startswith("fig1-"):
        return f"Figure 1 ({stem[5:]})"
    return {"fig1": "Figure 1", "fig2": "Figure 2", "synthetic_effect": "Effect per generator"}.get(stem, stem)


def _media(wr, runset, title: str, key: str):
    return wr.PanelGrid(runsets=[runset], panels=[
        wr.MediaBrowser(title=title, media_keys=[f"figures/{key}"], layout=wr.Layout(w=24, h=12))])


def _live_panels(wr, expr, entity: str, project: str, study: str):
    keys = (ENSEMBLE_SIZE, SYNTHETIC_RATIO, names.SYNTHETIC_SOURCE, TEMPERATURE)
    students = wr.Runset(entity=entity, project=project, name=f"students of study {study}",
                         filters=expr.And(expr.Config(names.STUDY) == study, expr.Config(names.JOB) == names.STUDENT),
                         groupby=[f"config.{k}" for k in keys])
    return wr.PanelGrid(runsets=[students], panels=[
        wr.LinePlot(title="test agreement over epochs", x=names.EPOCH, y=[names.TEST_AGREEMENT],
                    layout=wr.Layout(x=0, y=0, w=12, h=8)),
        wr.LinePlot(title="student test accuracy over epochs", x=names.EPOCH, y=[names.TEST_ACC],
                    layout=wr.Layout(x=12, y=0, w=12, h=8)),
        wr.ScatterPlot(title="final test agreement vs ensemble size", x=wr.Config(ENSEMBLE_SIZE),
                       y=wr.SummaryMetric(names.TEST_AGREEMENT), layout=wr.Layout(x=0, y=8, w=12, h=8)),
        wr.BarPlot(title="final test agreement by grid point (mean, min–max)", metrics=[names.TEST_AGREEMENT],
                   groupby_aggfunc="mean", groupby_rangefunc="minmax", layout=wr.Layout(x=12, y=8, w=12, h=8)),
    ])


def build_report(entity: str, project: str, study: str, dataset: str, arch: str, groups: list[Group],
                 n_teachers: int, figures_run_id: str | None, table_md: str, figures=FIGURES):
    """The W&B Report: text, the figures (media of the run that logged them, by stem) and live panels."""
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
    figs = None
    if figures_run_id:
        figs = wr.Runset(entity=entity, project=project, name="report figures",
                         filters=expr.And(expr.Metric("ID") == figures_run_id))
    sections = [("Figure 1: adding synthetic distillation data", [f for f in figures if f.startswith("fig1")]),
                ("Figure 2: teacher-ensemble size", ["fig2"] if "fig2" in figures else [])]
    if "synthetic_effect" in figures:
        sections.append(("Synthetic data: generator quality (FID) vs its effect", ["synthetic_effect"]))
    blocks = [wr.MarkdownBlock(text=intro)]
    for heading, stems in sections:
        blocks.append(wr.H2(text=heading))
        blocks += [_media(wr, figs, _title(stem), stem) for stem in stems if figs is not None]
    blocks += [wr.H2(text="Live panels (all student runs of the study)"),
               _live_panels(wr, expr, entity, project, study),
               wr.H2(text="Results table"), wr.MarkdownBlock(text="```\n" + table_md + "\n```")]
    return wr.Report(entity=entity, project=project, title=f"Does KD really work? study {study}"[:128],
                     description=f"{dataset}, {n_students} student runs", blocks=blocks)


def publish(entity: str, project: str, study: str, dataset: str, arch: str, groups: list[Group],
            n_teachers: int, paths: dict[str, Path], table_md: str) -> str:
    """Log every figure in ``paths`` (stem -> PNG) and the CSV to a report run; save the Report; its URL."""
    import wandb

    figures = [stem for stem, p in paths.items() if Path(p).suffix == ".png"]
    run = wandb.init(entity=entity, project=project, mode="online", job_type="report", name=f"report-{study}",
                     config={names.STUDY: study, names.JOB: "report"}, settings=wandb.Settings(silent=True))
    try:
        run.log({f"figures/{stem}": wandb.Image(str(paths[stem])) for stem in figures})
        with open(paths["csv"], newline="") as fh:
            rows = list(csv.reader(fh))
        run.log({"results": wandb.Table(columns=rows[0], data=rows[1:])})
        run_id = run.id
    finally:
        run.finish()
    report = build_report(entity, project, study, dataset, arch, groups, n_teachers, run_id, table_md, figures)
    report.save()
    return report.url
