"""python -m kd.bench runs every section and writes its JSON (tiny sizes; nothing here asserts a speed), and
its study projection counts what the sweeps run."""

import json
import math

import pytest
import yaml

from kd.bench import interleave
from kd.bench.projection import (
    STUDY,
    _counts,
    best_pack,
    pack_plan,
    pack_seconds,
    project,
    steps_per_epoch,
    student_runs,
    teacher_sets,
)
from tests.conftest import ROOT, assert_close_as, run_script


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
    # the pack section: a pack of k vs k plain students for every smoke k, looped on the CPU (the auto rule)
    packs = result["results"]["packs"]
    assert packs["how"] == "looped" and not packs["stacked"] and "CPU loops packs" in packs["compiled"]
    assert list(packs["k"]) == ["1", "2"] and packs["best_k"] in (1, 2) and not packs["skipped"]
    for k, res in packs["k"].items():
        assert any(w == f"pack k={k} (looped) vs {k} plain student" + ("s" if k != "1" else "") for w in whats)
        for variant in ("pack", "plain"):
            r = res[variant]
            assert len(res["samples_img_s"][variant]) == result["sizes"]["rounds"]
            assert math.isfinite(r["img_s_all"]) and r["img_s_all"] > 0
            assert r["img_s_member"] == pytest.approx(r["img_s_all"] / int(k))
            assert r["student_steps_s_all"] == pytest.approx(r["img_s_all"] / packs["batch"])
            assert r["student_steps_s_member"] == pytest.approx(r["student_steps_s_all"] / int(k))
        assert res["gain"] > 0
    assert any(w.startswith("pack compiled: not run") for w in whats)
    assert any(w.startswith("packs of k = 1 / 2 (looped)") for w in summary)
    # the projection names what it measured and what it extrapolated, and keeps looped packs out
    proj = result["projection"]
    assert proj["students"]["how"].startswith("plain") and proj["rates"]["pack_gain"] == {}
    for part in hours:
        if part != "total":
            assert proj["basis"][part]["measured"] and proj["basis"][part]["extrapolated"], part
    assert "packs (looped" in proj["basis"]["students"]["measured"]
    assert proj["work"]["total"]["new_pflop"] < proj["work"]["total"]["old_pflop"]  # 12 member passes, not 123
    assert "measured in this run" in result["projection_table"] and "CPU-h" in result["projection_table"]


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
    assert c["fig1_students"] == 30 and c["size_students"] == 54  # Figure 1: 2 m x 3 trials x (1 + 4 ratios x 1 pool)
    assert c["students"] == 78  # the ensemble-size sweep's m = 1, 3 runs at tau 1 are Figure 1's real-only runs
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
        runs |= {(m, float(r), float(tau), t, pool if r else "") for m in values(spec, "ensemble_size")
                 for r in values(spec, "synthetic_ratio") for tau in values(spec, "temperature")
                 for t in values(spec, "trial") for pool in values(spec, "synthetic_pool")}
        assert values(spec, "epochs") == [STUDY["student_epochs"]]
        assert values(spec, "batch_size") == [STUDY["student_batch"]]
    assert runs == set(student_runs())
    teachers = yaml.safe_load((folder / "teachers.yaml").read_text())["parameters"]
    assert len(values(teachers, "seed")) == STUDY["teachers"]
    assert values(teachers, "epochs") == [STUDY["teacher_epochs"]]
    assert values(teachers, "batch_size") == [STUDY["teacher_batch"]]


def test_projection_packs_the_study_by_ratio_and_pool():
    """Runs pack when they share the synthetic ratio (and pool above 0): 54 real-only runs, 4 groups of 6."""
    sizes = sorted((n, r) for n, r in pack_plan(16))
    assert sizes.count((16, 0.0)) == 3 and sizes.count((6, 0.0)) == 1
    assert sorted(n for n, r in sizes if r) == [6] * 4 and sum(n for n, _ in pack_plan(16)) == 78
    assert sum(n for n, _ in pack_plan(4)) == 78 and max(n for n, _ in pack_plan(4)) == 4
    # a pack of 6 is costed as the measured pack of 8; one plain student trains 100 img/s
    gains = {"1": 1.0, "2": 1.8, "4": 3.0, "8": 5.0, "16": 6.0}
    ep = STUDY["student_epochs"] * 128

    def secs(s, ratio):  # a pack costed as the measured pack of s, 300 epochs at that ratio
        return steps_per_epoch(ratio, 128, 50_000) * ep * s / (100.0 * gains[str(s)])

    want = 3 * secs(16, 0.0) + secs(8, 0.0) + sum(secs(8, r) for r in (0.25, 0.5, 0.75, 1.0))
    assert pack_seconds(16, gains, 100.0) == pytest.approx(want)
    best = best_pack(gains)
    assert best == min((1, 2, 4, 8, 16), key=lambda k: pack_seconds(k, gains, 1.0))
    assert best_pack({"1": 1.0, "2": 1.01}) is None  # within the noise margin: plain runs
    rates = {"teacher_img_s_old": 1e4, "teacher_img_s_new": 1e4, "student_img_s_old": 100.0,
             "student_img_s_new": 100.0, "member_fwd_s": 5e4, "stacked_fwd_s": {}, "load_gb_s": 1.0,
             "pool_img_s_old": 100.0, "pool_img_s_new": 100.0, "pack_gain": gains}
    p = project(rates)
    assert p["students"]["how"] == f"packs of {best}" and p["students"]["k"] == best
    assert p["hours"]["students"]["new_h"] == pytest.approx(pack_seconds(best, gains, 100.0) / 3600)
    assert p["hours"]["students"]["old_h"] == pytest.approx(_counts(STUDY)["student_images"] / 100.0 / 3600)
    assert f"in packs of {best}" in p["basis"]["students"]["extrapolated"]
    # a compiled pack's gain counts where it was measured at that size, and not elsewhere
    compiled = project({**rates, "pack_compile_gain": 1.5, "pack_compile_k": best})
    assert compiled["students"]["how"] == f"packs of {best}, compiled"
    assert compiled["hours"]["students"]["new_h"] == pytest.approx(p["hours"]["students"]["new_h"] / 1.5)
    other = project({**rates, "pack_compile_gain": 1.5, "pack_compile_k": best * 2})
    assert other["hours"]["students"]["new_h"] == pytest.approx(p["hours"]["students"]["new_h"])
    # without pack figures the students stay plain, compiled where that pays
    plain = project({**rates, "pack_gain": {}, "student_img_s_new": 200.0})
    assert plain["students"]["how"] == "plain, compiled"
    assert plain["hours"]["students"]["new_h"] == pytest.approx(p["hours"]["students"]["old_h"] / 2)


def test_pack_section_trains_what_plain_students_train(one_thread):
    """A looped pack and k plain students of the pack section take the very same steps (bitwise), and a
    stacked pack the same to float rounding: the section compares equal work."""
    import torch

    from kd.bench.packs import Pack, Plain, Students

    students = Students(2, "preresnet8", 4, 8, torch.device("cpu"))
    plain, looped, stacked = Plain(students, 2), Pack(students, 2, False), Pack(students, 2, True)
    for variant in (plain, looped, stacked):
        assert variant.round(2) > 0
    stacked.pack.close()  # the stacked weights back into the members' models
    for i in range(2):
        a, b, c = (v.state_dict() for v in (plain.models[i], looped.pack.models[i], stacked.pack.models[i]))
        for key in a:
            assert torch.equal(a[key], b[key]), key
            assert_close_as(c[key].float(), a[key].float(), torch.float32, 8 * 4 * 8 * 8, chained=2, msg=key)


@pytest.mark.slow  # compiles on the CPU (about a minute): make chaos runs it
def test_compiled_stacked_pack_steps_as_the_eager_one(one_thread):
    """The compile section's compiled pack (one torch.compile graph of the vmapped members) trains as the
    eager stacked pack does."""
    import torch

    from kd.bench.packs import Pack, Students

    students = Students(2, "preresnet8", 4, 8, torch.device("cpu"))
    eager, compiled = Pack(students, 2, True), Pack(students, 2, True, compiled=True)
    eager.round(2), compiled.round(2)
    eager.pack.close(), compiled.pack.close()
    for m_e, m_c in zip(eager.pack.models, compiled.pack.models):
        for (key, a), b in zip(m_e.state_dict().items(), m_c.state_dict().values()):
            assert_close_as(b.float(), a.float(), torch.float32, 8 * 4 * 8 * 8, chained=2, msg=key)


def test_pack_sizes_that_do_not_fit_the_budget_are_skipped_and_named(tmp_path, one_thread):
    """The first k always runs; a larger one that no longer fits is skipped, with every k above it, and named."""
    import torch

    from kd.bench.common import SMOKE, Bench
    from kd.bench.packs import bench_packs

    class FirstOnly:  # a budget with room for the first pack size only
        def fits(self, need: float) -> bool:
            return need == 0

        def elapsed(self) -> float:
            return 1.0

    rows = []
    b = Bench(SMOKE, torch.device("cpu"), tmp_path, False, FirstOnly(), rows, printer=lambda *a, **k: None)
    res = bench_packs(b)
    assert list(res["k"]) == ["1"] and res["best_k"] == 1
    assert res["skipped"] == ["pack k=2"] and b.skipped == ["pack k=2"]
    assert any(r["what"] == "pack k>=2: skipped" and r["ours"] == "over budget" for r in rows)


def test_bench_names_the_sections_its_budget_skips(tmp_path):
    out = run_script("-m kd.bench", "--smoke", "--budget=1", "--out=b.json", cwd=tmp_path)
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["skipped"] == ["train", "distill", "pack", "cache", "ensemble", "synthetic"]
    assert "skipped, over the run's budget: train, distill, pack, cache, ensemble, synthetic" in out.stdout
    assert result["projection"] is None and "no projection" in out.stdout
