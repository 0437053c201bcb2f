"""kd.report on real offline W&B runs: grouping, CSV, figures, grid warnings, resumed runs, errors."""

from __future__ import annotations

import csv
import os
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import wandb

from kd import report
from kd.errors import KDError

STUDY = "tiny"
N_REAL = 1437
EPOCHS = 3
# (ensemble_size, synthetic_ratio, temperature): 2 trials each. Missing on purpose: (3, 0.5, 1) for
# figure 1 and (3, 0, 4) for figure 2. (`wandb leet inspect` costs ~0.7 s a call: keep the study small.)
GRID = [(1, 0.0, 1.0), (1, 0.5, 1.0), (3, 0.0, 1.0), (1, 0.0, 4.0)]
TRIALS = (0, 1)
RESUMED = (1, 0.5, 1.0, 1)  # this student is written as two offline folders with one run id
ROOT = Path(__file__).resolve().parents[1]


def final_metrics(m, r, tau, trial) -> dict:
    """What each student logs at its last epoch (a made-up but distinct value per run)."""
    return {
        "test/acc": 0.60 + 0.02 * m - 0.03 * r + 0.011 * trial + 0.005 * tau,
        "test/agreement": 0.70 + 0.03 * m + 0.04 * r + 0.017 * trial - 0.002 * tau,
        "test/kl": 0.50 - 0.05 * m + 0.1 * trial + 0.01 * tau,
        "test/ece": 0.05 + 0.013 * trial + 0.001 * m,
        "teacher/test_acc": 0.65 + 0.03 * m + 0.007 * trial,
    }


def epoch_row(final: dict, epoch: int) -> dict:
    row = {k: v * epoch / EPOCHS for k, v in final.items() if k != "teacher/test_acc"}
    return {**row, "train/loss": 1.0 / epoch, "train/agreement": 0.5, "lr": 0.05, "epoch": epoch,
            "throughput/img_per_s": 1000.0}


SETTINGS = dict(silent=True, console="off", x_disable_stats=True, x_disable_meta=True,
                x_disable_machine_info=True)


def _init(root: Path, config: dict, **kw):
    return wandb.init(mode="offline", dir=str(root), project="kd-fidelity", config=config,
                      name=config["run_name"], settings=wandb.Settings(**SETTINGS), **kw)


def student_config(m, r, tau, trial, study=STUDY) -> dict:
    names = [f"teacher-digits-preresnet8-s{(trial * m + i) % 6}" for i in range(m)]
    return {"job": "student", "run_name": f"student-m{m}-t{trial}-r{r:g}-T{tau:g}", "dataset": "digits",
            "arch": "preresnet8", "seed": -1, "study": study, "epochs": EPOCHS, "ensemble_size": m,
            "trial": trial, "temperature": tau, "synthetic_ratio": r, "synthetic_pool": "", "teachers": "",
            "teacher_names": names, "teacher_hashes": [f"h{n[-1]}" for n in names]}


def make_student(root: Path, m, r, tau, trial, study=STUDY, finish=True, bump=0.0) -> str:
    final = final_metrics(m, r, tau, trial)
    final = {k: v + bump if k in ("test/acc", "test/agreement") else v for k, v in final.items()}
    run = _init(root, student_config(m, r, tau, trial, study))
    run.log({"teacher/test_acc": final["teacher/test_acc"]}, step=1)
    for e in range(1, EPOCHS + 1):
        run.log(epoch_row(final, e), step=e)
    if finish:
        run.summary.update({"data/n_real": N_REAL, "data/n_synthetic": round(r * N_REAL),
                            "teacher/test_acc": final["teacher/test_acc"], "final": True})
    run_id = run.id
    run.finish()
    return run_id


def make_resumed_student(root: Path, m, r, tau, trial) -> str:
    """Cut off after epoch 2, resumed: the second folder logs epoch 2 again (a new value) and epoch 3."""
    final = final_metrics(m, r, tau, trial)
    run = _init(root, student_config(m, r, tau, trial))
    run_id = run.id
    run.log({"teacher/test_acc": final["teacher/test_acc"]}, step=1)
    for e in (1, 2):
        run.log(epoch_row(final, e), step=e)
    run.finish()
    run = _init(root, student_config(m, r, tau, trial), id=run_id, resume="allow")
    run.log({**epoch_row(final, 2), "test/acc": 0.4242}, step=2)
    run.log(epoch_row(final, 3), step=3)
    run.summary.update({"data/n_real": N_REAL, "data/n_synthetic": round(r * N_REAL),
                        "teacher/test_acc": final["teacher/test_acc"], "final": True})
    run.finish()
    return run_id


def make_teacher(root: Path, seed: int) -> None:
    config = {"job": "teacher", "run_name": f"teacher-digits-preresnet8-s{seed}", "dataset": "digits",
              "arch": "preresnet8", "seed": seed, "study": STUDY, "epochs": EPOCHS}
    run = _init(root, config)
    for e in range(1, EPOCHS + 1):
        run.log({"train/loss": 1.0 / e, "test/acc": 0.7 + 0.01 * seed, "lr": 0.1, "epoch": e,
                 "throughput/img_per_s": 900.0}, step=e)
    run.summary["final"] = True
    run.finish()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    ids = {}
    for m, r, tau in GRID:
        for trial in TRIALS:
            if (m, r, tau, trial) == RESUMED:
                ids["resumed"] = make_resumed_student(root, *RESUMED)
            else:
                make_student(root, m, r, tau, trial)
    for seed in range(2):
        make_teacher(root, seed)
    ids["cut"] = make_student(root, 1, 0.0, 1.0, 2, finish=False)  # cut off, never resumed
    make_student(root, 1, 0.0, 1.0, 0, study="other")  # another study in the same folder
    return root, ids


def _args(root: Path, out: Path, *extra: str):
    return report.parse_args([f"--study={STUDY}", f"--wandb_dir={root}", f"--out={out}", "--offline",
                              f"--cache_dir={root / '.cache' / 'report'}", *extra])


@pytest.fixture(scope="module")
def result(study):
    root, _ = study
    return report.run_report(_args(root, root / "figures"))


def test_groups_match_logged_values(result):
    assert [g.key[:3] for g in result.groups] == sorted(GRID)
    for g in result.groups:
        assert len(g.runs) == 2
        assert g.n_real == N_REAL and g.n_synthetic == round(g.synthetic_ratio * N_REAL)
        for metric in report.METRICS:
            vals = [final_metrics(*g.key[:3], t)[metric] for t in TRIALS]
            s = g.stats[metric]
            assert s["n"] == 2
            assert s["mean"] == pytest.approx(statistics.fmean(vals), abs=1e-9)
            assert s["std"] == pytest.approx(statistics.stdev(vals), abs=1e-9)
            assert (s["min"], s["max"]) == pytest.approx((min(vals), max(vals)), abs=1e-9)
    assert len(result.teachers) == 2
    assert all(r.config["study"] == STUDY for r in result.students)  # the other study is left out


def test_csv_has_one_row_per_group(result):
    with open(result.paths["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(GRID)
    for row in rows:
        key = (int(row["ensemble_size"]), float(row["synthetic_ratio"]), float(row["temperature"]))
        vals = [final_metrics(*key, t)["test/agreement"] for t in TRIALS]
        assert row["study"] == STUDY and row["dataset"] == "digits" and row["n_runs"] == "2"
        assert float(row["test_agreement_mean"]) == pytest.approx(statistics.fmean(vals))
        assert float(row["test_agreement_std"]) == pytest.approx(statistics.stdev(vals))
        assert float(row["teacher_test_acc_max"]) == pytest.approx(final_metrics(*key, 1)["teacher/test_acc"])
        assert len(row["run_ids"].split()) == 2


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name", ["fig1", "fig2"])
def test_figures_written(result, name):
    path = result.paths[name]
    w, h = _png_size(path)
    assert w > 1200 and h > 500 and path.stat().st_size > 40_000
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_missing_grid_points_and_cut_runs_are_named(result, study):
    _, ids = study
    assert sorted(result.missing) == [
        "missing grid point (fig1): no finished run with ensemble_size=3 synthetic_ratio=0.5 temperature=1",
        "missing grid point (fig2): no finished run with ensemble_size=3 synthetic_ratio=0 temperature=4",
    ]
    cut = [w for w in result.warnings if "not finished" in w]
    assert len(cut) == 1 and ids["cut"] in cut[0] and "student-m1-t2-r0-T1" in cut[0]


def test_resumed_run_is_merged(result, study):
    root, ids = study
    folders = sorted((root / "wandb").glob(f"offline-run-*-{ids['resumed']}*"))
    assert len(folders) == 2
    (run,) = [r for r in result.students if r.id == ids["resumed"]]
    assert len(run.sources) == 2
    assert [row["_step"] for row in run.history] == [1, 2, 3]
    assert run.history[1]["test/acc"] == 0.4242  # step 2 logged twice: the resumed folder's row wins
    final = final_metrics(*RESUMED)
    assert run.history[2]["test/acc"] == pytest.approx(final["test/acc"])
    assert run.summary["test/acc"] == pytest.approx(final["test/acc"])
    assert run.config["trial"] == 1 and run.finished
    assert sum(r.id == ids["resumed"] for g in result.groups for r in g.runs) == 1


def test_expect_reads_sweep_specs(study, tmp_path):
    root, _ = study
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    common = "program: distill.py\nmethod: grid\n"
    recipe = f"  dataset: {{value: digits}}\n  arch: {{value: preresnet8}}\n  epochs: {{value: {EPOCHS}}}\n"
    (sweeps / "self_distill.yaml").write_text(common + (
        "parameters:\n" + recipe + "  ensemble_size: {value: 1}\n  synthetic_ratio: {values: [0.0, 0.5]}\n"
        "  trial: {values: [0, 1]}\n  temperature: {value: 1.0}\n  study: {value: tiny}\n"))
    (sweeps / "ensemble_distill.yaml").write_text(common + (
        "parameters:\n" + recipe + "  ensemble_size: {value: 3}\n  synthetic_ratio: {values: [0.0, 0.5]}\n"
        "  trial: {values: [0, 1]}\n"))
    (sweeps / "ensemble_size.yaml").write_text(common + (
        "parameters:\n" + recipe + "  ensemble_size: {values: [1, 3]}\n  temperature: {values: [1.0, 4.0]}\n"
        "  trial: {values: [0, 1]}\n"))
    (sweeps / "teachers.yaml").write_text("program: train.py\nmethod: grid\n"
                                          "parameters:\n  seed: {values: [0, 1]}\n")
    (sweeps / "later.yaml").write_text(common + (  # a spec not run yet: one line, not one per point
        "parameters:\n" + recipe + "  ensemble_size: {value: 4}\n  trial: {values: [0, 1]}\n"))
    res = report.run_report(_args(root, tmp_path / "figs", f"--expect={sweeps}"))
    expected = [f"missing grid point ({src}): no finished run with ensemble_size={m} synthetic_ratio={r} "
                f"temperature={t} trial={k}"
                for src, m, r, t in (("ensemble_distill.yaml", 3, 0.5, 1), ("ensemble_size.yaml", 3, 0, 4))
                for k in (0, 1)]
    expected.append("missing grid (later.yaml): none of its 2 grid points has a finished run (not run yet? "
                    "python -m kd.sweep on it)")
    assert sorted(res.missing) == sorted(expected)


def test_cli_subprocess(study, tmp_path):
    root, _ = study
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_DIR": str(root)}
    (tmp_path / ".cache").symlink_to(root / ".cache")  # reuse what the module fixture inspected
    out = subprocess.run([sys.executable, "-m", "kd.report", f"--study={STUDY}", "--out=figs"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "agreement %" in out.stdout and "teacher runs: 2 finished" in out.stdout
    assert "missing grid point (fig1)" in out.stderr
    for name in ("fig1.png", "fig2.png", "results.csv"):
        assert (tmp_path / "figs" / name).stat().st_size > 0


@pytest.mark.parametrize("flags,message", [
    (["--study=nothing"], "error: no finished runs for study nothing in {root}: run the sweeps first, "
                          "see README"),
    (["--study=../x"], "error: invalid study '../x'"),
    (["--study=tiny", "--publish", "--offline"], "error: --publish needs a W&B login: run `wandb login`"),
])
def test_user_errors_exit_2(study, tmp_path, capsys, flags, message):
    """Exit code 2, one line on stderr, no figures and no cache written (the cache dir here is empty)."""
    root, _ = study
    cache = tmp_path / "cache"
    shutil.copytree(root / ".cache", cache)  # already filled by the module fixture: fast
    before = sorted(p.stat().st_mtime_ns for p in cache.rglob("*"))
    argv = [f"--wandb_dir={root}", f"--out={tmp_path / 'figs'}", f"--cache_dir={cache / 'report'}", *flags]
    assert report.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(root=root)), lines
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    assert sorted(p.stat().st_mtime_ns for p in cache.rglob("*")) == before


def test_unreadable_folder_is_named(tmp_path):
    bad = tmp_path / "wandb" / "offline-run-20260101_000000-garbage1"
    bad.mkdir(parents=True)
    (bad / "run-garbage1.wandb").write_bytes(os.urandom(3000))
    with pytest.raises(KDError, match="cannot read W&B run folder .*offline-run-20260101_000000-garbage1"):
        report.run_report(_args(tmp_path, tmp_path / "figs"))
    assert not (tmp_path / "figs").exists()


def test_x_labels():
    def g(r, n):
        return report.Group({"ensemble_size": 1, "synthetic_ratio": r, "temperature": 1.0}, runs=[], stats={},
                            n_real=None, n_synthetic=n)

    assert [report.x_label(g(0.0, 0)), report.x_label(g(0.25, 12500)), report.x_label(g(1.0, 50000)),
            report.x_label(g(0.5, 719)), report.x_label(g(0.5, None))] == [
        "real only", "+12.5k", "+50k", "+719", "ratio 0.5"]


def test_report_object_builds_offline(result):
    import wandb_workspaces.reports.v2 as wr

    from kd.report.wandb_report import Content, Target

    rep = report.build_report(Target("someone", "kd-fidelity", STUDY, "digits", "preresnet8"),
                              Content(result.groups, 3, result.table), "abc123")
    assert rep.entity == "someone" and STUDY in rep.title
    grids = [b for b in rep.blocks if isinstance(b, wr.PanelGrid)]
    panels = [type(p).__name__ for grid in grids for p in grid.panels]
    assert panels.count("MediaBrowser") == 2
    assert {"LinePlot", "ScatterPlot", "BarPlot"} <= set(panels)
    live = grids[-1].runsets[0]  # exactly the runs the figures count: no cut-off run, no other study
    ids = sorted(r.id for g in result.groups for r in g.runs)
    assert len(ids) == 8 and live.filters == f'Metric("ID") in {ids!r}'


# ------------------------------------------------------------------------------------------------ broken folders
HEADER = b":W&B\xe1\xbe\x00"  # a .wandb transaction log's 7-byte header: ident, magic 0xBEE1, version 0


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """Two finished students, a newer duplicate of the first, a run SIGKILLed before its first record (its
    .wandb holds only the header, cut from a real one) and a folder with no .wandb file at all."""
    root = tmp_path_factory.mktemp("mini")
    old = make_student(root, 1, 0.0, 1.0, 0)
    other = make_student(root, 1, 0.0, 1.0, 1)
    new = make_student(root, 1, 0.0, 1.0, 0, bump=0.1)  # the same grid point again, later, other values
    (real,) = (root / "wandb").glob(f"offline-run-*-{old}")
    header = next(real.glob("run-*.wandb")).read_bytes()[:len(HEADER)]
    assert header == HEADER
    killed = root / "wandb" / "offline-run-20990101_000000-killed01"
    (killed / "files").mkdir(parents=True)
    (killed / "run-killed01.wandb").write_bytes(header)
    empty = root / "wandb" / "offline-run-20990101_000001-nolog001"
    empty.mkdir()
    return root, {"old": old, "other": other, "new": new, "killed": killed, "empty": empty}


def test_broken_folders_are_skipped_with_one_warning_each(mini, capsys):
    root, ids = mini
    capsys.readouterr()
    res = report.run_report(_args(root, root / "figures"))
    err = capsys.readouterr().err.splitlines()
    for folder, why in ((ids["killed"], "names no run_id"), (ids["empty"], "found 0")):
        lines = [ln for ln in err if str(folder) in ln]
        assert len(lines) == 1 and lines[0].startswith(f"warning: skipping unreadable W&B run folder {folder} ("), lines
        assert why in lines[0] and f"delete {folder} to silence this" in lines[0] and "resumed" in lines[0]
        assert folder in res.unreadable
    assert sorted(r.id for r in res.students) == sorted([ids["new"], ids["other"]])  # only the good runs
    assert res.paths["fig1"].exists() and res.paths["csv"].exists()


def test_duplicate_grid_point_counts_once_the_newest(mini):
    root, ids = mini
    res = report.run_report(_args(root, root / "figures"))
    (group,) = res.groups
    assert [(d.id, k.id) for d, k in res.dropped] == [(ids["old"], ids["new"])]
    dup = [w for w in res.warnings if "duplicate" in w]
    assert len(dup) == 1 and ids["old"] in dup[0] and f"kept student-m1-t0-r0-T1 ({ids['new']})" in dup[0]
    vals = [final_metrics(1, 0.0, 1.0, 0)["test/acc"] + 0.1, final_metrics(1, 0.0, 1.0, 1)["test/acc"]]
    s = group.stats["test/acc"]
    assert len(group.runs) == 2 and s["n"] == 2
    assert s["mean"] == pytest.approx(statistics.fmean(vals))
    assert (s["min"], s["max"]) == pytest.approx((min(vals), max(vals)))


def _run(rid, m, r, trial, t, acc, source=None, fid=None, tau=1.0, job="student") -> report.Run:
    config = {"job": job, "study": STUDY, "dataset": "cifar10", "arch": "preresnet56", "ensemble_size": m,
              "synthetic_ratio": r, "temperature": tau, "trial": trial}
    if source is not None:
        config["synthetic_source"] = source
    if fid is not None:
        config["synthetic_fid"] = fid
    summary = {"final": True, "test/acc": acc, "test/agreement": acc + 0.2, "test/kl": 0.1, "test/ece": 0.02,
               "teacher/test_acc": 0.9, "data/n_real": 50000, "data/n_synthetic": int(r * 50000)}
    return report.Run(id=rid, name=f"student-{rid}", config=config, summary=summary, time=t)


def test_dedupe_of_run_objects():
    runs = [_run("a", 3, 0.5, 0, t=300.0, acc=0.70, source="gan"),  # the newest of point (3, 0.5, trial 0)
            _run("b", 3, 0.5, 0, t=100.0, acc=0.10, source="gan"),
            _run("c", 3, 0.5, 0, t=200.0, acc=0.20, source="gan"),
            _run("d", 3, 0.5, 1, t=50.0, acc=0.60, source="gan"),
            _run("e", 3, 0.5, 0, t=10.0, acc=0.50, source="ddpm")]  # another generator: another point
    warnings: list[str] = []
    kept, dropped = report.dedupe(runs, warnings)
    assert [r.id for r in kept] == ["a", "d", "e"]
    assert sorted((d.id, k.id) for d, k in dropped) == [("b", "a"), ("c", "a")]
    assert len(warnings) == 1 and "2 duplicate run(s) dropped" in warnings[0]
    groups = report.group_students(kept, warnings)
    (gan,) = [g for g in groups if g.synthetic_source == "gan"]
    s = gan.stats["test/acc"]
    assert (s["n"], s["mean"], s["min"], s["max"]) == (2, pytest.approx(0.65), 0.60, 0.70)


# ------------------------------------------------------------------------------------------------ online
class FakeRun:
    """What the report reads of a `wandb.apis.public.Run`: id, name, state, heartbeat_at, history_line_count,
    created_at, url, and (from a full listing only) config and summary_metrics. A lazy listing's run raises
    on config/summary_metrics: the real SDK would then load that run alone (one request per run)."""

    def __init__(self, spec: dict, lazy: bool):
        self._spec, self._lazy = spec, lazy
        for k in ("id", "name", "state", "heartbeat_at", "history_line_count", "created_at", "url"):
            setattr(self, k, spec[k])

    @property
    def config(self):
        assert not self._lazy, "config read from a lazy listing: one request per run"
        return dict(self._spec["config"])

    @property
    def summary_metrics(self):
        assert not self._lazy, "summary read from a lazy listing: one request per run"
        return dict(self._spec["summary"])


class FakeApi:
    """Stands in for `wandb.Api(timeout=...)`: `.default_entity` and `.runs(path, filters, per_page, lazy)`
    over the class-level `RUNS` (dicts); every call is recorded in `CALLS`; `FAIL` (an exception) is raised
    by `.runs` when set, as the SDK raises on a missing project, a refused login or a dead network."""

    RUNS: list[dict] = []
    CALLS: list[dict] = []
    FAIL: BaseException | None = None
    default_entity = "me"

    def __init__(self, timeout=None, **kw):
        pass

    def runs(self, path, filters=None, order="+created_at", per_page=50, include_sweeps=False, lazy=True):
        FakeApi.CALLS.append({"path": path, "filters": filters, "per_page": per_page, "lazy": lazy})
        if FakeApi.FAIL is not None:
            raise FakeApi.FAIL
        parts = (filters or {}).get("$and", [filters or {}])  # {"config.study": s}, and maybe {"name": {"$in": ids}}
        study = next(p["config.study"] for p in parts if "config.study" in p)
        ids = next((p["name"]["$in"] for p in parts if "name" in p), None)
        return [FakeRun(s, lazy) for s in FakeApi.RUNS if s["config"].get("study") == study
                and (ids is None or s["id"] in ids)]


def _spec(run: report.Run, state="finished", beat="2026-01-01T00:00:00") -> dict:
    return {"id": run.id, "name": run.name, "state": state, "heartbeat_at": beat, "history_line_count": 3,
            "created_at": "2026-01-01T00:00:00", "url": f"https://wandb.ai/me/kd-fidelity/runs/{run.id}",
            "config": run.config, "summary": {**run.summary, "_timestamp": run.time}}


@pytest.fixture
def fake_api(monkeypatch):
    monkeypatch.setattr(wandb, "Api", FakeApi)
    FakeApi.RUNS, FakeApi.CALLS, FakeApi.FAIL = [], [], None
    return FakeApi


def two_source_runs() -> list[report.Run]:
    runs, t = [], 0.0
    for m in (1, 3):
        for trial in (0, 1):
            t += 1
            runs.append(_run(f"m{m}t{trial}r0", m, 0.0, trial, t, 0.60 + 0.02 * m + 0.01 * trial))
            for src, fid, gain in (("google/ddpm-cifar10-32", 3.2, 0.03), ("generator-cifar10-sngan", None, -0.02)):
                key = src.split("/")[-1][:14]
                runs.append(_run(f"m{m}t{trial}{key}", m, 0.5, trial, t, 0.60 + 0.02 * m + gain, src, fid))
    return runs


def test_online_cache_reused_until_a_run_changes(fake_api, tmp_path):
    from kd.report.online import OnlineCache, read_online

    fake_api.RUNS = [_spec(r) for r in two_source_runs()]
    path = tmp_path / "me-kd-fidelity-tiny.json"

    def read(refresh=False):
        cache = OnlineCache(path, refresh)
        runs, note = read_online(STUDY, "me", "kd-fidelity", cache)
        cache.save()
        calls, fake_api.CALLS[:] = list(fake_api.CALLS), []
        return runs, note, calls

    runs, note, calls = read()
    assert [c["lazy"] for c in calls] == [False]  # one full listing: config and summary come with it
    assert calls[0]["per_page"] >= 200 and calls[0]["filters"] == {"config.study": STUDY}
    assert len(runs) == 12 and note.startswith("pulled 12 runs") and path.exists()
    assert runs[0].summary["test/acc"] == fake_api.RUNS[0]["summary"]["test/acc"] and not runs[0].history
    assert "_timestamp" not in runs[0].summary and runs[0].time == 1.0

    again, note, calls = read()  # (b) nothing changed on W&B: the lightweight listing, then the cache
    assert [c["lazy"] for c in calls] == [True] and "unchanged" in note
    assert [vars(r) for r in again] == [vars(r) for r in runs]

    fake_api.RUNS[0]["heartbeat_at"] = "2026-01-02T00:00:00"  # (a) a run resumed and logged again
    fake_api.RUNS[0]["summary"]["test/acc"] = 0.99
    changed, note, calls = read()  # the lightweight listing, then the changed run alone, listed in full
    assert [c["lazy"] for c in calls] == [True, False] and note.startswith("1 run(s) of study tiny new or changed")
    assert calls[1]["filters"] == {"$and": [{"config.study": STUDY}, {"name": {"$in": [fake_api.RUNS[0]["id"]]}}]}
    assert changed[0].summary["test/acc"] == 0.99 and [vars(r) for r in changed[1:]] == [vars(r) for r in runs[1:]]

    fake_api.RUNS.append(_spec(_run("late", 1, 0.0, 5, 9.0, 0.5)))  # a new run: pulled alone
    added, _, calls = read()
    assert [c["lazy"] for c in calls] == [True, False] and len(added) == 13
    assert calls[1]["filters"]["$and"][1] == {"name": {"$in": ["late"]}} and added[-1].id == "late"
    del fake_api.RUNS[1]  # a run deleted on W&B: gone from the report, nothing pulled
    _, note, calls = read()
    assert [c["lazy"] for c in calls] == [True] and note.startswith("1 run(s) of study tiny removed")
    _, note, calls = read(refresh=True)  # --refresh: straight to the full listing
    assert [c["lazy"] for c in calls] == [False] and note.startswith("pulled")


def test_online_two_sources_draw_fig1_per_source(fake_api, tmp_path):
    fake_api.RUNS = [_spec(r) for r in two_source_runs()]
    out = tmp_path / "figs"
    res = report.run_report(report.parse_args([f"--study={STUDY}", "--online", "--entity=me", f"--out={out}",
                                               f"--cache_dir={tmp_path / 'cache'}", f"--wandb_dir={tmp_path}"]))
    names = {p.name for p in out.iterdir()}
    assert names == {"fig1.png", "fig1-google-ddpm-cifar10-32.png", "fig2.png", "synthetic_effect.png",
                     "results.csv"}
    for name in names - {"results.csv"}:
        w, h = _png_size(out / name)
        assert w > 600 and h > 300
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_source = {}
    for row in rows:
        by_source.setdefault(row["synthetic_source"], []).append(row)
    assert sorted(by_source) == ["", "generator-cifar10-sngan", "google/ddpm-cifar10-32"]
    assert all(len(v) == 2 and {r["synthetic_ratio"] for r in v} == {"0.5"} for k, v in by_source.items() if k)
    assert {r["synthetic_fid"] for r in by_source["google/ddpm-cifar10-32"]} == {"3.2"}
    assert {r["synthetic_fid"] for r in by_source["generator-cifar10-sngan"]} == {""}
    effects = {(e["source"], e["ensemble_size"]): e for e in report.synthetic_effects(res.groups)}
    assert set(effects) == {(s, m) for s in by_source if s for m in (1, 3)}
    assert effects[("google/ddpm-cifar10-32", 1)]["d_acc"] == pytest.approx(0.03 - 0.005)
    assert effects[("google/ddpm-cifar10-32", 3)]["fid"] == 3.2
    assert effects[("generator-cifar10-sngan", 1)]["fid"] is None
    assert not res.missing and (tmp_path / "cache" / f"me-kd-fidelity-{STUDY}.json").exists()


def test_one_source_keeps_todays_outputs(tmp_path):
    runs = [r for r in two_source_runs() if r.config.get("synthetic_source") != "generator-cifar10-sngan"]
    warnings: list[str] = []
    groups = report.group_students(report.dedupe(runs, warnings)[0], warnings)
    paths = report.write_outputs(groups, STUDY, "cifar10", "preresnet56", tmp_path)
    assert list(paths) == ["fig1", "fig2", "csv"] and {p.name for p in tmp_path.iterdir()} == {
        "fig1.png", "fig2.png", "results.csv"}


@pytest.mark.parametrize("fail,needle", [
    (wandb.errors.CommError("Could not find project kd-fidelity"), "check --entity=me and --project=kd-fidelity"),
    (ValueError("permission denied for entity me"), "run `wandb login`"),
    (__import__("requests").ConnectionError("Max retries exceeded with url"), "check the network connection"),
])
def test_online_api_failure_is_one_line(fake_api, tmp_path, capsys, fail, needle):
    fake_api.FAIL = fail
    argv = [f"--study={STUDY}", "--online", "--entity=me", f"--out={tmp_path / 'figs'}",
            f"--cache_dir={tmp_path / 'cache'}", f"--wandb_dir={tmp_path}"]
    assert report.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: W&B API: cannot list the runs of me/kd-fidelity ("), lines
    assert needle in lines[0] and lines[0].endswith("nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_online_without_runs_names_the_offline_study(fake_api, mini, capsys):
    root, _ = mini
    argv = [f"--study={STUDY}", "--online", "--entity=me", f"--out={root / 'online-figs'}",
            f"--cache_dir={root / '.cache' / 'report'}", f"--wandb_dir={root}"]
    assert report.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no finished runs for study {STUDY} in online: me/"), lines
    assert f"`wandb sync {root / 'wandb'}/offline-run-*`" in lines[0] and "pass --offline" in lines[0]
    assert f"3 offline run folder(s) of the study are on disk, e.g. {root / 'wandb'}/offline-run-" in lines[0]
    assert not (root / "online-figs").exists()


# ------------------------------------------------------------------------------- the synthetic effect figure
def _effect_run(rid, m, r, trial, acc, agree, source=None, fid=None) -> report.Run:
    run = _run(rid, m, r, trial, 1.0, acc, source, fid)
    run.summary["test/agreement"] = agree
    return run


# real only, per trial: (accuracy, agreement)
BASE = {0: (0.80, 0.85), 1: (0.84, 0.88), 2: (0.78, 0.86)}
# (source, fid, ratio) -> per trial (accuracy, agreement) with synthetic data; trial 2 missing for step10's 0.5
SYN = {("generator-cifar10-sngan@step10", 90.0, 0.5): {0: (0.76, 0.80), 1: (0.83, 0.86)},
       ("generator-cifar10-sngan@step10", 90.0, 1.0): {0: (0.75, 0.81), 1: (0.80, 0.83), 2: (0.70, 0.80)},
       ("generator-cifar10-sngan@step20", 60.0, 1.0): {0: (0.79, 0.86), 1: (0.81, 0.84), 2: (0.76, 0.85)},
       ("generator-cifar10-sngan", 40.0, 1.0): {0: (0.81, 0.87), 1: (0.86, 0.90), 2: (0.77, 0.89)},
       ("google/ddpm-cifar10-32", 5.0, 1.0): {0: (0.82, 0.90)}}


def _effect_groups(with_fid: bool = True) -> list:
    runs = [_effect_run(f"b{t}", 1, 0.0, t, *BASE[t]) for t in BASE]
    for (src, fid, ratio), per_trial in SYN.items():
        runs += [_effect_run(f"{src}-{ratio}-{t}", 1, ratio, t, *v, src, fid if with_fid else None)
                 for t, v in per_trial.items()]
    return report.group_students(runs, [])


def test_synthetic_effect_is_the_paired_change_with_a_t_interval():
    from scipy import stats

    rows = {(r["source"], r["ratio"]): r for r in report.synthetic_effects(_effect_groups())}
    assert set(rows) == {(s, r) for s, _, r in SYN}
    for (src, fid, ratio), per_trial in SYN.items():
        row = rows[(src, ratio)]
        assert (row["fid"], row["ensemble_size"], row["family"]) == (fid, 1, src.split("@")[0])
        assert row["step"] == (int(src.rsplit("@step", 1)[1]) if "@step" in src else None)
        for i, key in enumerate(("d_acc", "d_agreement")):
            changes = [per_trial[t][i] - BASE[t][i] for t in sorted(per_trial)]  # paired: same trial only
            assert row[f"{key}_n"] == len(changes)
            assert row[f"{key}_trials"] == pytest.approx(dict(zip(sorted(per_trial), changes)))
            assert row[key] == pytest.approx(statistics.fmean(changes))
            if len(changes) == 1:
                assert row[f"{key}_lo"] is None and row[f"{key}_hi"] is None
                continue
            sem = statistics.stdev(changes) / len(changes) ** 0.5
            lo, hi = stats.t.interval(0.95, len(changes) - 1, loc=statistics.fmean(changes), scale=sem)
            assert (row[f"{key}_lo"], row[f"{key}_hi"]) == pytest.approx((lo, hi), rel=1e-9)
            table = {1: 12.706, 2: 4.303}[len(changes) - 1]  # t_0.975 from a printed table
            assert row[f"{key}_hi"] - row[key] == pytest.approx(table * sem, rel=1e-3)
    # by hand for one of them: accuracy changes -0.05, -0.04, -0.08 -> mean -0.05667, sd 0.02082
    row = rows[("generator-cifar10-sngan@step10", 1.0)]
    assert row["d_acc"] == pytest.approx(-0.17 / 3) and row["d_acc_lo"] == pytest.approx(-0.17 / 3 - 0.0517, abs=1e-4)


def _drawn_points(ax) -> list[tuple[float, float, str]]:
    return [(float(line.get_xdata()[0]), float(line.get_ydata()[0]), line.get_marker()) for line in ax.lines
            if len(line.get_xdata()) == 1 and line.get_marker() not in ("None", None, "", "_")]  # not the caps


def test_effect_figure_draws_intervals_against_fid_one_marker_per_family(tmp_path):
    from kd.report.effect import figure_effect

    groups = _effect_groups()
    rows = report.synthetic_effects(groups)
    fig = figure_effect(groups, "s", "cifar10", "preresnet56")
    for ax, key in zip(fig.axes[:2], ("d_acc", "d_agreement")):  # 1 teacher: accuracy, agreement
        points = _drawn_points(ax)
        assert len(points) == len(rows)
        markers = {}
        for r in rows:  # each mean at its FID (shifted sideways by under 1 FID per amount), in percentage points
            (hit,) = [p for p in points if abs(p[0] - r["fid"]) < 1.0 and p[1] == pytest.approx(100 * r[key])]
            markers.setdefault(r["family"], set()).add(hit[2])
        assert all(len(m) == 1 for m in markers.values()) and len(set().union(*markers.values())) == 2
        bars = sorted((round(min(s[:, 1]), 6), round(max(s[:, 1]), 6)) for c in ax.collections
                      for s in c.get_segments())
        want = sorted((round(100 * r[f"{key}_lo"], 6), round(100 * r[f"{key}_hi"], 6)) for r in rows
                      if r[f"{key}_lo"] is not None)
        assert bars == want  # one 95% interval per mean over two or more trials, none for the lone trial
        assert "FID" in ax.get_xlabel()
    report.save_figure(fig, tmp_path / "effect.png")
    w, h = _png_size(tmp_path / "effect.png")
    assert w > 600 and h > 300

    fig = figure_effect(_effect_groups(with_fid=False), "s", "cifar10", "preresnet56")  # no FID: categories
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(ticks) == 4 and all("FID unknown" in t for t in ticks)
    assert ticks[0].startswith("generator-cifar10-sngan\nstep 10") and "final" in ticks[2]
    assert len(_drawn_points(fig.axes[0])) == len(rows)


def test_effect_of_the_authors_epochs_is_one_family_on_their_fid_axis():
    """The authors' imported snapshots (generator-X-gnosis-eN) are one family ordered by epoch; with no standard
    FID known but the authors' own for every source, the x axis is the authors' measure and says so; the CSV
    carries both FIDs."""
    from kd.report.effect import family_of, figure_effect, snapshot_label, step_of

    assert family_of("generator-cifar100-gnosis-e300") == "generator-cifar100-gnosis"
    assert family_of("generator-cifar100-gnosis-e300-bilinear") == "generator-cifar100-gnosis-bilinear"
    assert (step_of("generator-cifar100-gnosis-e300"), snapshot_label("generator-cifar100-gnosis-e300")) == (
        300, "epoch 300")
    assert (step_of("generator-cifar100-sngan"), snapshot_label("generator-cifar100-sngan")) == (None, "final")
    authors = {100: 96.26, 300: 40.5, 500: 26.2}
    runs = [_effect_run(f"b{t}", 1, 0.0, t, *BASE[t]) for t in BASE]
    for epoch, fid in authors.items():
        for t in BASE:
            run = _effect_run(f"e{epoch}-{t}", 1, 1.0, t, BASE[t][0] - fid / 1000, BASE[t][1] + fid / 2000,
                              f"generator-cifar10-gnosis-e{epoch}", None)
            run.config["synthetic_fid_authors"] = fid
            runs.append(run)
    groups = report.group_students(runs, [])
    rows = sorted(report.synthetic_effects(groups), key=lambda r: r["step"])
    assert [(r["family"], r["step"], r["fid"], r["fid_authors"]) for r in rows] == [
        ("generator-cifar10-gnosis", e, None, f) for e, f in authors.items()]
    fig = figure_effect(groups, "s", "cifar10", "preresnet56")
    ax = fig.axes[0]
    assert "authors' own measure" in ax.get_xlabel() and "not comparable" in ax.get_xlabel()
    points = _drawn_points(ax)
    for r in rows:
        assert any(abs(x - r["fid_authors"]) < 1.0 and y == pytest.approx(100 * r["d_acc"]) for x, y, _ in points)
    assert len({m for _, _, m in points}) == 1  # one family, one marker
    csv_text = report.results_csv(groups, "s", "cifar10", "preresnet56")
    header, *lines = csv_text.splitlines()
    col = header.split(",").index("synthetic_fid_authors")
    assert sorted(float(v) for line in lines if (v := line.split(",")[col])) == sorted(authors.values())


@pytest.mark.parametrize("band", ["std", "minmax"])
def test_figure1_band_is_mean_plus_minus_std_or_the_range(band):
    """The shading of Figure 1 is mean ± 1 std over trials (the paper's captions) by default, the trials' range
    with --band=minmax; the legend says which."""
    from kd.report.figures import BANDS, figure1

    accs = {0.0: [0.70, 0.74, 0.80], 0.5: [0.60, 0.66, 0.65]}
    runs = [_run(f"r{r}-{t}", 1, r, t, 1.0, a, source="gan" if r else None) for r, vals in accs.items()
            for t, a in enumerate(vals)]
    groups = report.group_students(runs, [])
    fig = figure1(groups, STUDY, "cifar10", "preresnet56", source="gan", band=band)
    right = [ax for ax in fig.axes if ax.get_ylabel() == "test accuracy (%)"][0]
    ys = [y for c in right.collections for path in c.get_paths() for y in path.vertices[:, 1]]  # the bands
    for vals in accs.values():
        mean, sd = statistics.fmean(vals), statistics.stdev(vals)
        lo, hi = (mean - sd, mean + sd) if band == "std" else (min(vals), max(vals))
        assert any(y == pytest.approx(100 * lo) for y in ys) and any(y == pytest.approx(100 * hi) for y in ys)
    assert BANDS[band] in fig.legends[0].get_title().get_text()
    assert report.parse_args(["--study=s", f"--band={band}"]).band == band


# ------------------------------------------------------------------------------------------ static and online
def _protocol_groups() -> list:
    runs = []
    for protocol, lift in (("static", 0.0), ("online", 0.03)):
        for m in (1, 3):
            for r in (0.0, 0.5, 1.0):
                for t in (0, 1):
                    acc = 0.6 + 0.05 * m + (lift * r) + 0.01 * t - 0.02 * r
                    run = _run(f"{protocol}-{m}-{r}-{t}", m, r, t, 1, acc, source="gen" if r else None, fid=30.0)
                    if protocol == "online":
                        run.config["synthetic_mode"] = "online"
                    runs.append(run)
    return report.group_students(runs, [])


def test_static_and_online_are_one_line_each_in_figure_1_and_categories_of_the_effect():
    from kd.report.effect import synthetic_effects
    from kd.report.figures import figure1, figure2

    groups = _protocol_groups()
    assert sorted({g.protocol for g in groups}) == ["online", "static"] and len(groups) == 12
    fig = figure1(groups, STUDY, "cifar10", "preresnet56", source="gen")
    agreement_axes = [fig.axes[0], fig.axes[1]]  # the two panels' left axes
    for ax in agreement_axes:
        styles = sorted(line.get_linestyle() for line in ax.lines if len(line.get_xdata()) == 3)
        assert styles == ["-", ":"], styles  # one agreement line per protocol over the 3 amounts
        assert len(ax.collections) == 2  # and a band over trials for each
        online = next(line for line in ax.lines if line.get_linestyle() == ":")
        want = [100 * g.stats["test/agreement"]["mean"] for g in sorted(
            (g for g in groups if g.protocol == "online" and g.ensemble_size == (1 if ax is fig.axes[0] else 3)),
            key=lambda g: g.synthetic_ratio)]
        assert list(online.get_ydata()) == pytest.approx(want)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "static synthetic data" in legend and "online synthetic data" in legend
    rows = synthetic_effects(groups)
    assert {(r["protocol"], r["ensemble_size"], r["ratio"]) for r in rows} == {
        (p, m, r) for p in ("static", "online") for m in (1, 3) for r in (0.5, 1.0)}
    for r in rows:  # paired against the real-only runs of its own protocol: the lift is online's only
        lift = 0.03 if r["protocol"] == "online" else 0.0
        assert r["d_acc"] == pytest.approx((lift - 0.02) * r["ratio"])
    from kd.report.effect import figure_effect

    assert {r["family"] for r in rows} == {"gen", "gen (online)"}
    effect = figure_effect(groups, STUDY, "cifar10", "preresnet56")  # on the FID axis: one marker per protocol
    assert len({marker for _, _, marker in _drawn_points(effect.axes[0])}) == 2
    from kd.report.effect import _tick

    assert _tick(("gen", "online"), None, False) == "gen\nonline\nFID unknown"  # categories without FID
    fig2 = figure2(groups, STUDY, "cifar10", "preresnet56")  # real data only: the static runs, once per m
    assert all(len(line.get_xdata()) <= 2 for line in fig2.axes[1].lines)
