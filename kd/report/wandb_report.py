"""``--publish``: the figures and the CSV logged to a ``report`` run, and the study's W&B Report that shows them.

The Report holds an introduction, each figure as the media of the run that logged it (``figures/<stem>``:
fig1, one fig1-<source> per other synthetic source, fig2 and synthetic_effect when drawn), live panels and the
results table. The live panels' runset is exactly the runs the figures count: one finished run per grid point
(its filter is the list of their W&B run ids, not study and job, which would also hold duplicates and cut-off
runs), grouped as the figures group them, so each panel's mean is the figure's.

Each study has one Report, titled :func:`report_title`: ``--publish`` lists the project's Reports once
(``wandb.Api().reports``) and saves over the one with that title (the latest updated, if several), through
the SDK's own update (a ``Report`` with the existing ``id``: ``upsertView`` of that view); only a study without
one gets a new Report.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from kd import names
from kd.config import GROUP_AXES
from kd.report.aggregate import ENSEMBLE_SIZE, Group
from kd.report.figures import BANDS, DEFAULT_BAND

FIGURES = ("fig1", "fig2")


def _title(stem: str) -> str:
    if stem.startswith("fig1-"):
        return f"Figure 1 ({stem[5:]})"
    return {"fig1": "Figure 1", "fig2": "Figure 2", "synthetic_effect": "Effect per generator"}.get(stem, stem)


def _media(wr, runset, title: str, key: str):
    return wr.PanelGrid(runsets=[runset], panels=[
        wr.MediaBrowser(title=title, media_keys=[f"figures/{key}"], layout=wr.Layout(w=24, h=12))])


GROUP_KEYS = (*(a.key for a in GROUP_AXES), names.SYNTHETIC_SOURCE)  # a figure's group


def report_title(study: str) -> str:
    """The study's Report title: how ``--publish`` finds the Report to update. (No "?": the Report's URL
    carries the title.)"""
    return f"Does KD really work: study {study}"[:128]


def _titles(study: str) -> set[str]:
    """The titles a study's Report has had (the first carried a "?"); a Report found by either gets the new one."""
    return {report_title(study), f"Does KD really work? study {study}"[:128]}


def counted_ids(groups: list[Group]) -> list[str]:
    """The W&B run ids of the runs the figures count (one per grid point), sorted."""
    return sorted({r.id for g in groups for r in g.runs})


def regrouped(groups: list[Group]) -> list[str]:
    """Labels of the counted runs the live panels group elsewhere than the figures: a run given its teachers by
    name (``--teachers``) whose config's ensemble_size is not the number of teachers it used."""
    return [r.label for g in groups for r in g.runs if r.config.get(ENSEMBLE_SIZE) != g.ensemble_size]


def _live_panels(wr, expr, entity: str, project: str, groups: list[Group]):
    students = wr.Runset(entity=entity, project=project, name="the runs the figures count",
                         filters=[expr.Metric("ID").isin(counted_ids(groups))],
                         groupby=[f"config.{k}" for k in GROUP_KEYS])
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


@dataclass(frozen=True)
class Target:
    """Where a study's Report goes and what it is about."""

    entity: str
    project: str
    study: str
    dataset: str
    arch: str


@dataclass(frozen=True)
class Content:
    """What the Report shows: the groups the figures count, the teacher runs' count, the results table."""

    groups: list
    n_teachers: int
    table: str


def build_report(target: Target, content: Content, figures_run_id: str | None = None, figures=FIGURES,
                 report_id: str = ""):
    """The W&B Report: text, the figures (media of the run that logged them, by stem) and live panels;
    ``report_id``: the id of the study's existing Report, which saving then updates."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    entity, project, study, dataset, arch = target.entity, target.project, target.study, target.dataset, target.arch
    groups, n_teachers, table_md = content.groups, content.n_teachers, content.table
    n_students = sum(len(g.runs) for g in groups)
    intro = (
        f"Reproduction of Stanton et al. 2021, *Does Knowledge Distillation Really Work?*, study `{study}` "
        f"({dataset}, student {arch}): {n_students} finished student runs (one per grid point) in "
        f"{len(groups)} groups, {n_teachers} teacher runs. **Agreement** is the share of test images where "
        f"student and teacher predict the same class (fidelity); **accuracy** is generalization. Figures show "
        f"the mean over trials, shaded: {BANDS[DEFAULT_BAND]}. Made with `python -m kd.report --study={study} "
        "--publish`."
    )
    if moved := regrouped(groups):
        intro += (f" The live panels group {len(moved)} run(s) by their config's ensemble_size, not by the "
                  f"teachers they used as the figures do: {', '.join(moved[:10])}.")
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
    blocks += [wr.H2(text="Live panels (the runs the figures count)"),
               _live_panels(wr, expr, entity, project, groups),
               wr.H2(text="Results table"), wr.MarkdownBlock(text="```\n" + table_md + "\n```")]
    report = wr.Report(entity=entity, project=project, title=report_title(study),
                       description=f"{dataset}, {n_students} student runs", blocks=blocks)
    report.id = report_id
    return report


def existing_report(entity: str, project: str, study: str) -> tuple[str, int]:
    """The id of the study's Report in ``entity/project`` ("" when it has none) and how many Reports carry its
    title: one listing of the project's Reports."""
    import wandb

    want = _titles(study)
    found = [r for r in wandb.Api(timeout=60).reports(f"{entity}/{project}") if r.display_name in want]
    if not found:
        return "", 0
    newest = max(found, key=lambda r: (str(r.updated_at or r.created_at or ""), str(r.id)))
    return str(newest.id), len(found)


def log_figures(entity: str, project: str, study: str, paths: dict[str, Path]) -> tuple[str, list[str]]:
    """Every figure in ``paths`` (stem -> PNG) and the CSV, logged to a new ``report`` run; its id, the stems."""
    import wandb

    figures = [stem for stem, p in paths.items() if Path(p).suffix == ".png"]
    run = wandb.init(entity=entity, project=project, mode="online", job_type="report", name=f"report-{study}",
                     config={names.STUDY: study, names.JOB: "report"}, settings=wandb.Settings(silent=True))
    try:
        run.log({f"figures/{stem}": wandb.Image(str(paths[stem])) for stem in figures})
        with open(paths["csv"], newline="") as fh:
            rows = list(csv.reader(fh))
        run.log({"results": wandb.Table(columns=rows[0], data=rows[1:])})
        return run.id, figures
    finally:
        run.finish()


def publish(target: Target, content: Content, paths: dict[str, Path]) -> tuple[str, str]:
    """Log the figures and the CSV to a report run, then save the study's Report over its existing one (or a
    new one); its URL and what was done ("updated" or "created", and how many others share the title)."""
    study = target.study
    report_id, same = existing_report(target.entity, target.project, study)
    run_id, figures = log_figures(target.entity, target.project, study, paths)
    report = build_report(target, content, run_id, figures, report_id=report_id)
    report.save()
    done = "updated" if report_id else "created"
    if same > 1:
        done += f"; {same - 1} older Report(s) of study {study} left as they are"
    return report.url, done
