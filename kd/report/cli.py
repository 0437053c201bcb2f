"""``python -m kd.report``: the flags, and the report from reading the runs to writing (and publishing) it.

Errors a user can fix are one line and exit code 2 (:func:`kd.errors.cli`), with nothing written: the
figures, the CSV and the caches are written only once every check passed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kd import names
from kd.errors import KDError, check_name, cli, first_line
from kd.flags import REQUIRED, check_fields, parse_flags, setting
from kd.io import atomic_write, check_folder
from kd.report.aggregate import (
    ARCH,
    DATASET,
    Group,
    dedupe,
    facet_text,
    facets,
    group_students,
    in_facet,
    only,
)
from kd.report.effect import figure_effect
from kd.report.figures import BANDS, DEFAULT_BAND, fig1_names, figure1, figure2, save_figure, slug
from kd.report.grid import check_grid, spec_files, split_by_grid
from kd.report.online import OnlineCache, api_errors, default_entity, read_online
from kd.report.runs import InspectCache, Run, read_offline, unreadable_note, warn
from kd.report.tables import results_csv, table
from kd.wandb_runs import offline_folders, wandb_mode


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
    dropped: list[tuple[Run, Run]] = field(default_factory=list)  # (duplicate, the run kept instead)
    unreadable: dict[Path, str] = field(default_factory=dict)  # skipped run folders and why


@dataclass
class Loaded:
    """The runs of the study, where they came from, and the caches to save once the outputs are written."""

    runs: list[Run]
    where: str
    caches: list
    note: str | None = None
    entity: str | None = None
    project: str | None = None
    unreadable: dict[Path, str] = field(default_factory=dict)


@dataclass
class ReportSettings:
    """python -m kd.report --study=S: figures, a CSV and a W&B Report from the runs of one study."""

    study: str = setting(REQUIRED, "the --study label the runs were made with", name=True)
    wandb_dir: str = setting("", "folder holding wandb/offline-run-*; empty: $WANDB_DIR, else the current folder")
    out: str = setting("figures", "output folder for fig1.png, fig2.png, results.csv")
    mode: str = setting("auto", "where the runs are read: online (the W&B API) | offline (the run folders on disk) | "
                                "auto (online when logged in)", choices=("auto", "online", "offline"),
                        switches=("online", "offline"))
    entity: str = setting("", "online: W&B entity; empty: $WANDB_ENTITY, else yours")
    project: str = setting("", f"online: W&B project; empty: $WANDB_PROJECT, else {names.PROJECT}")
    publish: bool = setting(False, "also save the study's W&B Report, over the one it has (needs `wandb login`)",
                            choices=(True, False))
    refresh: bool = setting(False, "ignore the caches in --cache_dir: read every run again", choices=(True, False))
    expect: str = setting("", "a folder of sweep specs (or one spec): warn about each grid point of its student "
                              "sweeps without a finished run, and count only the runs of that grid")
    expect_paper_grid: bool = setting(False, "also expect the paper's synthetic ratios 0, 0.25, 0.5, 0.75, 1.0 in "
                                             "Figure 1", choices=(True, False))
    cache_dir: str = setting(".cache/report", "folder of the report's caches")
    band: str = setting(DEFAULT_BAND, "the shading around each mean line: std (mean ± 1 std over trials, as the "
                                      "paper's captions) | minmax (the trials' range)", choices=tuple(BANDS))

    def validate(self) -> None:
        check_fields(self)
        check_name(self.study, "study")


def parse_args(argv: list[str] | None = None) -> ReportSettings:
    return parse_flags(ReportSettings, argv)


def _wandb_dir(args) -> Path:
    return Path(args.wandb_dir or os.environ.get("WANDB_DIR") or ".")


def _load_online(args, study: str) -> Loaded:
    entity = args.entity or os.environ.get("WANDB_ENTITY")
    project = check_name(args.project or os.environ.get("WANDB_PROJECT") or names.PROJECT, "project")
    if not entity:
        entity = default_entity()
    if not entity:
        raise KDError("no W&B entity: pass --entity=NAME (your user or team)")
    check_name(entity, "entity")
    cache = OnlineCache(Path(args.cache_dir) / f"{entity}-{project}-{study}.json", args.refresh)
    runs, note = read_online(study, entity, project, cache)
    return Loaded(runs, f"online: {entity}/{project}", [cache], note, entity, project)


def _load(args, study: str, mode: str, warnings: list[str]) -> Loaded:
    if mode == "online":
        return _load_online(args, study)
    wandb_dir = _wandb_dir(args)
    cache = InspectCache(Path(args.cache_dir) / "offline-inspect.json", args.refresh, warnings)
    runs, unreadable = read_offline(study, wandb_dir, cache, warnings)
    return Loaded(runs, str(wandb_dir.resolve()), [cache], unreadable=unreadable)


def _no_runs(args, study: str, got: Loaded, teachers: list[Run]) -> KDError:
    hint = f" ({len(teachers)} finished teacher runs, but no students)" if teachers else ""
    head = f"no finished runs for study {study} in {got.where}{hint}"
    if got.entity is not None and offline_folders(_wandb_dir(args)):
        cache = InspectCache(Path(args.cache_dir) / "offline-inspect.json", False, None)
        runs, _ = read_offline(study, _wandb_dir(args), cache, None)  # read only: nothing is written
        on_disk = [Path(f) for r in runs for f in r.sources]
        if on_disk:
            return KDError(f"{head}, but {len(on_disk)} offline run folder(s) of the study are on disk, e.g. "
                           f"{on_disk[0]}: upload them with `wandb sync {on_disk[0].parent}/offline-run-*` "
                           f"(or `wandb sync {on_disk[0]}` for one), or pass --offline to report them from disk")
    return KDError(f"{head}: run the sweeps first, see README{unreadable_note(got.unreadable)}")


def write_outputs(groups: list[Group], study: str, dataset: str, arch: str, out: Path,
                  band: str = DEFAULT_BAND) -> dict[str, Path]:
    """Per facet (:func:`kd.report.aggregate.facets`: one for a study whose runs agree in every axis beyond the
    figures' own; the first without a suffix, the others ``-{facet}``): Figure 1 per synthetic source, Figure 2,
    synthetic_effect.png (two categories or more: sources, or one source static and online); then the CSV of every
    group."""
    paths: dict[str, Path] = {}
    for i, facet in enumerate(facets(groups)):
        mine, label = in_facet(groups, facet), facet_text(facet)
        suffix = f"-{slug(label or 'default')}" if i else ""
        for source, stem in fig1_names(mine).items():
            paths[stem + suffix] = out / f"{stem}{suffix}.png"
            save_figure(figure1(mine, study, dataset, arch, source, label, band), paths[stem + suffix])
        paths["fig2" + suffix] = out / f"fig2{suffix}.png"
        save_figure(figure2(mine, study, dataset, arch, label, band), paths["fig2" + suffix])
        if len({(g.synthetic_source, g.protocol) for g in mine if g.synthetic_source is not None}) > 1:
            paths["synthetic_effect" + suffix] = out / f"synthetic_effect{suffix}.png"
            save_figure(figure_effect(mine, study, dataset, arch), paths["synthetic_effect" + suffix])
    paths["csv"] = out / "results.csv"
    with atomic_write(paths["csv"], "w") as fh:
        fh.write(results_csv(groups, study, dataset, arch))
    return paths


def _publish(got: Loaded, study: str, dataset: str, arch: str, result: Result) -> None:
    from kd.report.wandb_report import Content, Target, publish

    try:
        result.url, done = publish(Target(got.entity, got.project, study, dataset, arch),
                                   Content(result.groups, len(result.teachers), result.table), result.paths)
    except api_errors() as e:
        why = first_line(e)
        out = result.paths["csv"].parent
        raise KDError(f"--publish failed ({why}); the figures and CSV in {out} are written") from None
    print(f"W&B Report ({done}): {result.url}")


def run_report(args: ReportSettings) -> Result:
    study = check_name(args.study, "study")
    mode = args.mode if args.mode != "auto" else ("online" if wandb_mode() == "online" else "offline")
    if args.publish and mode != "online":
        raise KDError("--publish needs a W&B login: run `wandb login` (or set WANDB_API_KEY) and rerun; "
                      "nothing was written")
    if args.expect:
        spec_files(Path(args.expect))
    check_folder(args.out, "--out")  # every folder the report writes, before it reads or writes anything
    check_folder(args.cache_dir, "--cache_dir")
    warnings: list[str] = []
    got = _load(args, study, mode, warnings)
    unfinished = [r for r in got.runs if not r.finished and r.job in (names.TEACHER, names.STUDENT)]
    finished = [r for r in got.runs if r.finished and r.job == names.STUDENT]
    teachers = [r for r in got.runs if r.finished and r.job == names.TEACHER]
    if not finished:
        raise _no_runs(args, study, got, teachers)
    if got.note:
        print(got.note, file=sys.stderr)
    if unfinished:
        warn(warnings, f"{len(unfinished)} run(s) of study {study} not finished (no summary final=True; "
             f"cut off and not yet resumed?), ignored: " + ", ".join(r.label for r in unfinished))
    if args.expect:
        finished, outside = split_by_grid(finished, args.expect, study)
        if outside:
            warn(warnings, f"{len(outside)} run(s) of study {study} not in the study's grid (their config is no "
                 f"point of the sweeps in {args.expect}), not counted: " + ", ".join(r.label for r in outside))
        if not finished:
            raise KDError(f"no finished run of study {study} is a point of the sweeps in {args.expect}: run the "
                          "sweeps, or drop --expect")
    dataset = only({str(r.config.get(DATASET, "?")) for r in finished}, DATASET, study)
    arch = only({str(r.config.get(ARCH, "?")) for r in finished}, ARCH, study)
    students, dropped = dedupe(finished, warnings)
    groups = group_students(students, warnings)
    missing = check_grid(students, groups, args, warnings)
    text = table(groups, teachers)
    paths = write_outputs(groups, study, dataset, arch, Path(args.out), args.band)
    for cache in got.caches:
        cache.save()
    print(f"study {study} ({dataset}, {arch}): {len(students)} student runs, {len(teachers)} teacher runs "
          f"from {got.where}")
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    result = Result(groups, students, teachers, unfinished, warnings, missing, paths, text, None, dropped,
                    got.unreadable)
    if args.publish:
        _publish(got, study, dataset, arch, result)
    return result


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0, or 2 after one ``error: ...`` line (a usage error or a :class:`KDError`)."""
    try:
        with cli():
            run_report(parse_args(argv))
    except SystemExit as e:
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    return 0
