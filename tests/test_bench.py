"""python -m kd.bench runs every section and writes its JSON (tiny sizes; nothing here asserts a speed), and
its study projection counts what the sweeps run."""

import json
import math

import pytest
import yaml

from kd.bench import interleave
from kd.bench.projection import STUDY, _counts, project, steps_per_epoch, student_runs, teacher_sets
from tests.conftest import ROOT, run_script


def test_interleave_rotates_the_order_every_round():
    seen = []
    out = interleave({k: (lambda k=k: seen.append(k) or 1.0) for k in "abc"}, rounds=3)
    assert seen == list("abc" "bca" "cab") and out == {k: [1.0] * 3 for k in "abc"}


def test_bench_smoke_writes_table_and_json(tmp_path):
    out = run_script("-m kd.bench", "--smoke", "--out=bench/results.json", cwd=tmp_path)
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"] and result["smoke"]
    whats = [r["what"] for r in result["rows"]]
    for needle in ("engine vs bare", "teacher training: engine vs paper", "distill m=2: engine (cache) vs paper",
                   "cache vs teachers each step", "cache build m=2", "ensemble m=2", "synthetic ddpm",
                   "synthetic ddim", "synthetic dpm", "cache build m=2: per member vs stacked ensemble",
                   "cache file: load + verify"):
        assert any(needle in w for w in whats), needle
    for r in result["rows"]:
        if "value" in r:
            assert math.isfinite(r["value"]) and r["value"] > 0
    assert result["table"] in out.stdout and "targets:" in out.stdout
    assert not list(tmp_path.glob("runs")) and not list(tmp_path.glob("wandb"))  # nothing left behind
    # the table and the projection, from this run's rates
    assert result["summary_table"] in out.stdout and result["projection_table"] in out.stdout
    summary = {r["what"]: r for r in result["summary"]}
    assert any(w.startswith("cache build m = 1 / m = 2") for w in summary) and "`python -m kd.bench --device=cpu`" \
        in summary
    hours = result["projection"]["hours"]
    assert set(hours) == {"teachers", "students", "cache builds", "cache loads", "pool (50k DDIM-100)", "total"}
    assert all(math.isfinite(v["old_h"]) and v["new_h"] > 0 for v in hours.values())
    assert hours["cache builds"]["new_h"] < hours["cache builds"]["old_h"]  # 12 member passes instead of 123
    assert result["results"]["distillation"]["m2"]["members_shared"] == 1  # m = 2 reuses the m = 1 member's file
    assert "compile" in result["skipped"] or "compile" not in result["results"]  # the CPU compiles only if asked


@pytest.mark.slow  # a long end-to-end test: make chaos runs it
def test_bench_compile_section_on_the_cpu(tmp_path):
    """--compile runs the compile section in a child: compiled vs eager, no recompiles, SIGTERM honoured."""
    out = run_script("-m kd.bench", "--smoke", "--compile", "--skip=train,distill,cache,ensemble,synthetic",
                     "--out=c.json", cwd=tmp_path, timeout=600)
    res = json.loads((tmp_path / "c.json").read_text())["results"]["compile"]
    assert res["ended"] == "finished", res["ended"]
    assert res["sigterm"]["honoured"] and res["sigterm"]["stopped_at_step"] == 1 and res["sigterm"]["checkpoint"]
    for r in res["per_round"]["default"]:
        assert r["graphs_at_end"] == r["graphs_after_epoch_1"], "recompiled after the first epoch"
    assert res["samples_img_s"]["default"] and res["samples_img_s"]["eager"]
    assert "compile (default): compiled vs eager student step" in out.stdout
    assert "`--compile=True` (student step)" in out.stdout


def test_bench_refuses_unknown_sections_in_one_line(tmp_path):
    out = run_script("-m kd.bench", "--smoke", "--skip=trian", cwd=tmp_path, check=False)
    assert out.returncode == 2 and "unknown sections ['trian']" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_projection_counts_what_the_sweeps_run():
    c = _counts(STUDY)
    assert c["fig1_students"] == 30 and c["size_students"] == 54
    assert c["students"] == 78  # the ensemble-size sweep's m = 1, 3 runs at tau 1 are Figure 1's ratio-0 runs
    assert c["member_passes_old"] == 123 and c["member_passes_new"] == 12  # "about 120 where 12 would do"
    assert len(teacher_sets()) == c["ensembles"] == 24
    assert steps_per_epoch(0.0, 128, 50_000) == 391 and steps_per_epoch(1.0, 128, 50_000) == 782
    assert steps_per_epoch(0.25, 128, 50_000) == math.ceil(50_000 / math.ceil(128 * 50_000 / 62_500))
    rates = {"teacher_img_s_old": 1e4, "teacher_img_s_new": 2e4, "student_img_s_old": 5e3, "student_img_s_new": 1e4,
             "member_fwd_s": 5e4,
             "stacked_fwd_s": {"3": 5e3}, "load_gb_s": 1.0, "pool_img_s_old": 100.0, "pool_img_s_new": 200.0}
    h = project(rates)["hours"]
    assert h["teachers"]["old_h"] == pytest.approx(12 * 200 * 50_000 / 1e4 / 3600)
    assert h["teachers"]["new_h"] == pytest.approx(h["teachers"]["old_h"] / 2)
    assert h["cache builds"]["new_h"] == pytest.approx(12 * 50_000 * 162 / 5e4 / 3600)
    assert h["pool (50k DDIM-100)"]["new_h"] == pytest.approx(50_000 / 200 / 3600)
    assert h["total"]["old_h"] == pytest.approx(sum(v["old_h"] for k, v in h.items() if k != "total"))


def test_projection_study_is_the_cifar100_sweeps():
    folder = ROOT / "sweeps" / "cifar100"

    def values(spec, k):
        return spec[k]["values"] if "values" in spec[k] else [spec[k]["value"]]

    runs = set()
    for sweep in ("self_distill", "ensemble_distill", "ensemble_size"):
        spec = yaml.safe_load((folder / f"{sweep}.yaml").read_text())["parameters"]
        runs |= {(m, float(r), float(tau), t) for m in values(spec, "ensemble_size")
                 for r in values(spec, "synthetic_ratio") for tau in values(spec, "temperature")
                 for t in values(spec, "trial")}
        assert values(spec, "epochs") == [STUDY["student_epochs"]]
        assert values(spec, "batch_size") == [STUDY["student_batch"]]
    assert runs == set(student_runs())
    teachers = yaml.safe_load((folder / "teachers.yaml").read_text())["parameters"]
    assert len(values(teachers, "seed")) == STUDY["teachers"]
    assert values(teachers, "epochs") == [STUDY["teacher_epochs"]]
    assert values(teachers, "batch_size") == [STUDY["teacher_batch"]]
