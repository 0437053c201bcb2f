"""python -m kd.bench: every section runs at smoke sizes and is in the JSON as soon as it ends, the budget skips
later sections with their reason, timings synchronise with the device, the projection counts the sweeps' runs.
Nothing here asserts a speed."""

import json
import time

import pytest
import torch

from kd.bench import cli
from kd.bench.packs import conv_shapes, section_processes
from kd.bench.projection import project, run_steps
from kd.bench.settings import BenchSettings, spec_configs
from kd.bench.steps import busy_union
from kd.bench.timing import Clock, Record, Timer
from kd.errors import KDError
from tests.conftest import ROOT, run_script

SECTIONS = [name for name, _ in cli.SECTIONS]
SPEC = ROOT / "sweeps" / "cifar100" / "self_distill.yaml"


def test_smoke_runs_every_section_and_writes_the_json(tmp_path):
    t0 = time.perf_counter()
    out = run_script("-m kd.bench", "--smoke", "--out=bench/results.json", cwd=tmp_path)
    seconds = time.perf_counter() - t0
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert result["order"] == SECTIONS and result["skipped"] == {}, (result["skipped"], seconds)
    assert result["machine"]["cores"] >= 1 and result["settings"]["smoke"] and result["budget_s"] == 45
    student = result["sections"]["student"]
    assert set(student["variants"]) == {"fp32 eager", "bf16 eager"} and student["best"] in student["variants"]
    assert set(student["left_out"]) == {"bf16 compiled", "bf16 CUDA graphs"}  # the CPU compiles only when told
    packs = result["sections"]["packs"]
    assert list(packs["k"]) == ["1", "2", "4"] and packs["conv_rows"]
    assert all(r["k"] == 4 and r["grouped_s"] > 0 and r["separate_s"] > 0 for r in packs["conv_rows"])
    epoch = result["sections"]["epoch"]
    assert epoch["steps"] == 32 // 4 and epoch["eval_s"] > 0 and epoch["checkpoint_s"] > 0
    assert result["sections"]["cache"]["views"] == 162 and result["sections"]["cache"]["load_s"] > 0
    assert "assumption" in result["sections"]["processes"] and not result["sections"]["processes"]["measured"]
    proj = result["projection"]
    assert {r["spec"] for r in proj["rows"]} >= {"teachers.yaml", "self_distill.yaml", "teacher cache"}
    assert all(r["configuration"] for r in proj["rows"]) and "smoke" in proj["note"]
    assert "total, plain steps" in out.stdout


def test_the_json_holds_each_section_when_it_ends(tmp_path, monkeypatch):
    """After every section the file on disk already holds it (a run killed later keeps what it measured)."""
    seen = []
    section = Record.section

    def spy(self, name, result):
        section(self, name, result)
        seen.append((name, json.loads(self.path.read_text())["sections"]))

    monkeypatch.setattr(Record, "section", spy)
    threads = torch.get_num_threads()
    try:
        cli.main(["--smoke", f"--out={tmp_path / 'r.json'}"])
    finally:
        torch.set_num_threads(threads)
    assert [name for name, _ in seen] == SECTIONS
    for i, (name, on_disk) in enumerate(seen):
        assert sorted(on_disk) == sorted(SECTIONS[:i + 1]), (name, list(on_disk))
        assert "partial" not in on_disk[name]  # the finished section replaces what it saved on its way


class FakeClock(Clock):
    def __init__(self, budget_s):
        super().__init__(budget_s)
        self.now = 0.0

    def elapsed(self):
        return self.now


def test_the_budget_skips_later_sections_with_their_reason(tmp_path, monkeypatch):
    clock, ran = FakeClock(25.0), []

    def fake_section(ctx, name):  # every section takes 10 s of the budget
        ran.append(name)
        clock.now += 10
        return {"measured": name}

    monkeypatch.setattr(cli, "run_section", fake_section)
    record = Record(tmp_path / "r.json", {})
    ctx = cli.Context(BenchSettings(), None, torch.device("cpu"), None, clock, tmp_path, record, 1.0)
    cli.run_all(ctx)
    # student needs 20 s (25 left): runs; teacher 20 (15 left), packs 40: skipped; processes 0: runs; ...
    assert ran == ["student", "processes"]
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk["order"] == ran and set(on_disk["skipped"]) == {"teacher", "packs", "epoch", "cache"}
    assert all(r.startswith("over budget: ") and "needs about" in r for r in on_disk["skipped"].values())


def test_a_real_run_within_a_small_budget_records_what_it_skipped(tmp_path):
    run_script("-m kd.bench", "--smoke", "--budget_s=1.5", "--out=r.json", cwd=tmp_path)
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["order"]) | set(result["skipped"]) == set(SECTIONS) and result["skipped"]
    assert result["order"] == [s for s in SECTIONS if s in result["order"]]
    assert all(r.startswith("over budget") for r in result["skipped"].values())


class FakeEvent:
    log: list = []

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.id = len([e for e in self.log if e[0] == "event"])
        self.log.append(("event", self.id))

    def record(self):
        self.log.append(("record", self.id))

    def synchronize(self):
        self.log.append(("event synchronize", self.id))

    def elapsed_time(self, end):
        assert ("event synchronize", end.id) in self.log  # read only after the end event completed
        return 30.0  # ms


def test_the_timer_uses_cuda_events_and_synchronises_on_cuda(monkeypatch):
    log = FakeEvent.log = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("synchronize",)))
    timer = Timer(torch.device("cuda"), min_s=0.0, warmup=1, span=3, min_spans=1)
    out = timer.per_step(lambda: log.append(("step",)))
    assert out["s"] == pytest.approx(0.030 / 3) and out["steps"] == 3
    assert log == [("step",), ("event", 0), ("event", 1), ("synchronize",), ("record", 0), ("step",), ("step",),
                   ("step",), ("record", 1), ("event synchronize", 1)]


def test_the_timer_synchronises_other_devices_around_perf_counter(monkeypatch):
    import kd.bench.timing as timing

    calls = []
    monkeypatch.setattr(timing, "synchronize", lambda device: calls.append(device.type))
    timer = Timer(torch.device("cpu"), min_s=0.0, warmup=0, span=2, min_spans=2)
    out = timer.per_step(lambda: time.sleep(0.01))
    assert calls == ["cpu"] * 4 and out["s"] >= 0.01 and len(out["spans"]) == 2


def test_busy_union_counts_overlapping_kernels_once():
    assert busy_union([(0, 2), (1, 3), (5, 6), (5.5, 5.8)]) == 4
    assert busy_union([]) == 0


def test_conv_shapes_cover_every_convolution_of_the_network():
    from torch import nn

    from kd.models import build_model

    rows = conv_shapes("preresnet20", 100)
    convs = sum(isinstance(m, nn.Conv2d) for m in build_model("preresnet20", 100).modules())
    assert sum(r["count"] for r in rows) == convs
    assert {(r["cin"], r["cout"], r["stride"], r["size"]) for r in rows} >= {(16, 32, 2, 32), (64, 64, 1, 8)}


def test_processes_are_a_projection_from_the_busy_fraction_with_its_assumption():
    ctx = type("C", (), {"device": torch.device("cuda")})()
    student = {"best": "bf16 eager", "variants": {"bf16 eager": {"gpu_busy_fraction": 0.25, "img_per_s": 100.0}}}
    out = section_processes(ctx, student)
    assert not out["measured"] and "time-slice" in out["assumption"]
    assert {k: v["speedup"] for k, v in out["k"].items()} == {"1": 1, "2": 2, "4": 4, "8": 4}


def test_the_projection_counts_every_run_at_its_measured_rate():
    _, configs = spec_configs(SPEC)
    sections = {"student": {"best": "bf16 eager", "arch": "preresnet56", "batch": 128,
                            "variants": {"bf16 eager": {"s_per_step": 0.01}}}}
    proj = project(SPEC, sections, 50_000)
    row = next(r for r in proj["rows"] if r["spec"] == "self_distill.yaml")
    assert row["runs"] == len(configs) == 15 and "bf16 eager" in row["configuration"]
    assert row["gpu_hours"] == pytest.approx(sum(run_steps(c, 50_000) for c in configs) * 0.01 / 3600)
    assert run_steps(configs[0], 50_000) == 300 * -(-50_000 * (1 + configs[0].synthetic_ratio) // 128)
    assert "teachers.yaml (teacher)" in proj["left_out"] and proj["total_gpu_hours_with_packs"] is None


def test_cuda_without_a_gpu_and_a_bad_spec_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KDError, match="no CUDA device"):
        cli.resolve(BenchSettings(device="cuda"))
    out = run_script("-m kd.bench", "--smoke", "--spec=nowhere.yaml", cwd=tmp_path, check=False)
    assert out.returncode == 2 and "--spec: nowhere.yaml does not exist" in out.stderr
    assert not (tmp_path / "bench").exists()
