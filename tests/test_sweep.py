"""The sweep specs and the offline runner (python -m kd.sweep), against W&B's own validator and agent code.

Nothing here runs train.py or distill.py: the runner is exercised with a small program the tests write, which
joins the entry points a spec may name (kd.sweep.spec.ENTRY_POINTS) for these tests only.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from kd.config import DistillConfig, TrainConfig
from kd.sweep import cli as sweep_cli
from kd.sweep import runner as sweep_runner
from kd.sweep import spec as sweep_spec

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "sweeps").glob("*/*.yaml"))
STUDY = {"cifar10": "cifar10-paper", "cifar100": "cifar100-paper", "demo": "demo", "demo-generators": "demo-generators"}
# where the synthetic images come from: Figure 1 and the ensemble-size sweeps sample the authors' own SN-GAN
# (epoch 500, imported) per run; the demos take their DDPM's pool
GENERATOR = {"cifar10": "generator-cifar10-gnosis-e500", "cifar100": "generator-cifar100-gnosis-e500"}
POOL = {"demo": "synthetic-digits-hard-generator-digits-hard", "demo-generators": "synthetic-digits-generator-digits"}
# sample quality within one family: the authors' epochs 100..500 and an SN-GAN retrained here; the diffusion
# family as a pool of its own spec (a block of it per trial)
QUALITY = {"cifar10": [f"generator-cifar10-gnosis-e{e}" for e in (100, 200, 300, 400, 500)] + [
               "generator-cifar10-sngan"],
           "cifar100": [f"generator-cifar100-gnosis-e{e}" for e in (100, 200, 300, 400, 500)] + [
               "generator-cifar100-sngan"],
           "demo-generators": ["generator-digits-sngan@step100", "generator-digits-sngan@step200",
                               "generator-digits-sngan"]}
DDPM_POOL = {"cifar10": "synthetic-cifar10-ddpm-cifar10-32", "cifar100": "synthetic-cifar100-generator-cifar100"}
RUNS = {("cifar10", "teachers"): 12, ("cifar10", "self_distill"): 15, ("cifar10", "ensemble_distill"): 15,
        ("cifar10", "ensemble_size"): 54, ("cifar10", "generator_quality"): 72,
        ("cifar10", "generator_quality_ddpm"): 12, ("demo", "teachers"): 4,
        ("demo", "self_distill"): 10, ("demo", "ensemble_distill"): 10, ("demo", "ensemble_size"): 8,
        ("demo-generators", "teachers"): 1, ("demo-generators", "self_distill"): 6,
        ("demo-generators", "self_distill_sngan"): 18,
        # Figure 1 online: 1 and 3 teachers x 5 amounts x 3 trials (the demo: 2 trials)
        ("cifar10", "online"): 30, ("cifar100", "online"): 30, ("demo", "online"): 20}
ONLINE_GENERATOR = {"cifar10": "generator-cifar10-gnosis-e500", "cifar100": "generator-cifar100-gnosis-e500",
                    "demo": "generator-digits-hard-sngan"}
LAUNCH = ["${env}", "${interpreter}", "-m", "kd.sweep.launch", "${program}", "${args}"]

PROGRAM = r'''
import json, os, signal, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)

def log(event):
    with open("calls.jsonl", "a") as fh:
        fh.write(json.dumps({"event": event, "x": args.get("x"), "run_id": os.environ.get("WANDB_RUN_ID"),
                             "param_path": os.environ.get("WANDB_SWEEP_PARAM_PATH"), "argv": sys.argv[1:],
                             "python": sys.executable, "pid": os.getpid(), "pgid": os.getpgid(0),
                             "ppid": os.getppid(), "t": time.time()}) + "\n")

def on_term(signum, frame):
    log("term")
    sys.exit(143)

signal.signal(signal.SIGTERM, on_term)
log("start")
marker = f"attempted-{args.get('x')}"
first = not os.path.exists(marker)
open(marker, "a").close()
if first and args.get("x") == args.get("preempt_x"):  # as if SIGTERMed from outside: checkpointed, exit 143
    log("preempted")
    sys.exit(143)
slow = first and args.get("x") == args.get("slow_x")  # the first attempt of slow_x hangs until killed
time.sleep(float(args["first_sleep"] if slow else args.get("sleep", "0")))
if args.get("x") == args.get("fail_on"):
    print("error: boom: failing on purpose", file=sys.stderr)  # a program's one-line error,
    print("wandb: Find logs at: ./wandb/...", file=sys.stderr)  # then the lines W&B prints as its run ends
    sys.exit(3)
log("end")
'''


def make_sweep(folder: Path, parameters: dict, command: list | None = None, name: str = "tiny.yaml") -> Path:
    (folder / "prog.py").write_text(PROGRAM)
    spec = {"program": "prog.py", "method": "grid", "metric": {"name": "test/acc", "goal": "maximize"},
            "parameters": parameters}
    if command is not None:
        spec["command"] = command
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def calls(folder: Path) -> list[dict]:
    path = folder / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def state_of(folder: Path) -> dict:
    (path,) = (folder / "runs" / "sweeps").glob("*/state.json")
    return json.loads(path.read_text())


@pytest.fixture(autouse=True)
def stand_in_program(tmp_path, monkeypatch):
    """The tests' prog.py (in tmp_path) is an entry point a spec may name, its flags unchecked."""
    monkeypatch.setitem(sweep_spec.ENTRY_POINTS, tmp_path.resolve() / "prog.py", None)


def cli(folder: Path, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.chdir(folder)
    rc = sweep_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# `python -m kd.sweep`, with the folder's prog.py added to the entry points first (as stand_in_program does)
SPAWN = ("import sys; from pathlib import Path; from kd.sweep import cli, spec; "
         "spec.ENTRY_POINTS[Path('prog.py').resolve()] = None; sys.exit(cli.main())")


def spawn(folder: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", SPAWN, *args], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------------------------------------ the specs
def test_every_spec_is_there():
    assert {(p.parent.name, p.stem) for p in SPECS} == {
        (d, s) for d in STUDY if d != "demo-generators"
        for s in ("teachers", "self_distill", "ensemble_distill", "ensemble_size")} | {
        ("demo-generators", "teachers"), ("demo-generators", "self_distill"), ("demo-generators", "self_distill_sngan"),
        *((d, s) for d in ("cifar10", "cifar100") for s in ("generator_quality", "generator_quality_ddpm")),
        ("cifar10", "online"), ("cifar100", "online"), ("demo", "online")}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_spec_is_valid_for_wandb_and_the_program(path):
    config = yaml.safe_load(path.read_text())
    assert sweep_spec.sweeps_engine().schema_violations_from_proposed_config(config) == []
    spec = sweep_spec.load_spec(path)  # also parses every run's flags with the program's own parser
    cls = {"train.py": TrainConfig, "distill.py": DistillConfig}[config["program"]]
    assert set(config["parameters"]) <= {f.name for f in fields(cls)}
    assert config["command"] == LAUNCH
    assert config["method"] == "grid"
    params = config["parameters"]
    folder, kind = path.parent.name, path.stem
    assert params["study"] == {"value": STUDY[folder]}
    teacher = kind == "teachers"
    assert config["program"] == ("train.py" if teacher else "distill.py")
    assert config["metric"] == {"name": "test/acc" if teacher else "test/agreement", "goal": "maximize"}
    if folder not in ("demo", "demo-generators"):
        assert params["arch"] == {"value": "preresnet56"} and params["dataset"] == {"value": folder}
    assert len(spec.grid) == RUNS.get((folder, kind), RUNS.get(("cifar10", kind)))
    source = {k: params[k] for k in ("synthetic_pool", "synthetic_generator") if k in params}
    if teacher:
        assert not source
    elif kind == "online":  # the authors' SN-GAN sampled in every step: no pool
        assert params["synthetic_mode"] == {"value": "online"}
        assert source == {"synthetic_generator": {"value": ONLINE_GENERATOR[folder]}}
        assert params["synthetic_ratio"] == {"values": [0.0, 0.25, 0.5, 0.75, 1.0]}
        assert params["ensemble_size"] == {"values": [1, 3]}
        assert all(run.get("synthetic_generator_bn", {"value": "train"}) == {"value": "train"} for run in spec.grid)
    elif kind == "generator_quality" or kind == "self_distill_sngan":
        assert source == {"synthetic_generator": {"values": QUALITY[folder]}}  # one family, 3+ qualities
    elif kind == "generator_quality_ddpm":
        assert source == {"synthetic_pool": {"value": DDPM_POOL[folder]}}
    elif folder in GENERATOR:
        assert source == {"synthetic_generator": {"value": GENERATOR[folder]}}  # the paper's generator
    else:
        assert source == {"synthetic_pool": {"value": POOL[folder]}}
    if kind.startswith(("generator_quality", "self_distill_sngan")) or folder == "demo-generators" and not teacher:
        assert params["synthetic_ratio"] == {"values": [0.0, 1.0]} and len(params["trial"]["values"]) >= 3
    elif kind in ("self_distill", "ensemble_distill"):
        assert params["synthetic_ratio"] == {"values": [0.0, 0.25, 0.5, 0.75, 1.0]}
        assert params["ensemble_size"] == {"value": 1 if kind == "self_distill" else 3}


@pytest.mark.parametrize("folder", sorted({p.parent.name for p in SPECS}))
def test_no_student_of_a_study_shares_a_seed_with_a_teacher(folder):
    """The seed rule over every spec: students' seeds (weights and data order) lie outside every teacher's."""
    from kd.sweep.plan import runs_of

    specs = [sweep_spec.load_spec(p) for p in SPECS if p.parent.name == folder]
    runs = [(s.program, cfg) for s in specs for cfg in runs_of(s).values()]
    teacher_seeds = {cfg.run_seed for program, cfg in runs if program == "train.py"}
    student_seeds = {cfg.run_seed for program, cfg in runs if program == "distill.py"}
    assert teacher_seeds and student_seeds and teacher_seeds.isdisjoint(student_seeds)
    trials = {cfg.trial for program, cfg in runs if program == "distill.py"}
    assert len(student_seeds) == len(trials)  # one seed per trial: a grid point's trials differ, its axes do not


def test_demo_fits_in_minutes():
    total = sum(len(sweep_spec.load_spec(p).grid) for p in SPECS if p.parent.name == "demo"
                and p.stem != "online")  # the online demo is a sweep of its own, not a step of make demo
    assert total <= 32  # 4 teachers and 28 grid points (24 students: 4 real-only points are shared)


# ------------------------------------------------------------------------- the argv equals the agent's
class _Captured:
    commands: list = []

    def __init__(self, command=None, env=None, **kwargs):
        _Captured.commands.append((command, env))


def agent_argv(monkeypatch, tmp_path, command: list, program: str, config: dict, run_id: str, sweep_id: str):
    """What wandb's own Agent._command_run starts for one run (its process class swapped for a recorder)."""
    from wandb import wandb_agent

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_ID", sweep_id)
    monkeypatch.setenv("WANDB_RUN_ID", "placeholder")  # set so that monkeypatch restores them afterwards
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "placeholder")
    monkeypatch.setattr(wandb_agent, "AgentProcess", _Captured)
    _Captured.commands = []
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id=sweep_id)
    agent._sweep_command = list(command)
    agent._command_run({"run_id": run_id, "args": config, "program": program})
    ((argv, _env),) = _Captured.commands
    return argv


@pytest.mark.parametrize("path", SPECS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_dry_run_prints_the_agents_argv(path, tmp_path, monkeypatch, capsys):
    rc, out, err = cli(REPO, monkeypatch, capsys, path, "--dry-run", "--state-dir", tmp_path / "state")
    assert rc == 0, err
    lines = out.splitlines()
    spec = sweep_spec.load_spec(path)
    assert len(lines) == len(spec.grid)
    for i, (line, config) in enumerate(zip(lines, spec.grid)):
        want = agent_argv(monkeypatch, tmp_path, spec.command, spec.program, config, f"run{i}", spec.sweep_id)
        assert shlex.split(line) == want
        assert want[:5] == ["/usr/bin/env", "python", "-m", "kd.sweep.launch", spec.program]
    assert not (tmp_path / "state").exists()  # a dry run writes nothing


def test_every_macro_matches_the_agent(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_TEST_VAR", "hello")
    command = ["${env}", "${interpreter}", "${program}", "--fixed", "pre-${envvar:KD_TEST_VAR}-post",
               "${args}", "${args_no_boolean_flags}", "${args_json_file}", "${args_no_hyphens}",
               "${args_json}", "${args_no_equals}", "${not_a_macro}", 7]
    path = make_sweep(tmp_path, {"flag": {"values": [True, False]}, "lr": {"value": 1.0e-5},
                                 "name": {"value": "a b"}, "n": {"values": [1, 2]}}, command)
    spec = sweep_spec.Spec(path, yaml.safe_load(path.read_text()))  # not load_spec: it refuses this command
    spec.grid = sweep_spec.enumerate_grid(spec)
    assert len(spec.grid) == 4
    for i, config in enumerate(spec.grid):
        run_id = f"r{i}"
        json_file = tmp_path / "wandb" / f"sweep-{spec.sweep_id}" / f"config-{run_id}.json"
        ours = sweep_spec.build_argv(spec, config, str(json_file))
        assert ours == agent_argv(monkeypatch, tmp_path, command, "prog.py", config, run_id, spec.sweep_id)
        assert "pre-hello-post" in ours and "--lr=1e-05" in ours and "--name=a b" in ours


# ------------------------------------------------------------------------------------------- the runner
def test_runs_every_config_once_and_skips_finished_ones(tmp_path, monkeypatch, capsys):
    path = make_sweep(tmp_path, {"x": {"values": [1, 2, 3]}, "sleep": {"value": 0}})
    rc, out, err = cli(tmp_path, monkeypatch, capsys, path, "--count", "2")
    assert rc == 0, err
    assert "[1/3] running prog.py --x=1" in out and "[2/3] running prog.py --x=2 (eta " in out
    assert [c["x"] for c in calls(tmp_path) if c["event"] == "end"] == ["1", "2"]
    rc, out, err = cli(tmp_path, monkeypatch, capsys, path)
    assert rc == 0, err
    assert "[3/3] running prog.py --x=3" in out and "3/3 finished" in out
    rc, out, err = cli(tmp_path, monkeypatch, capsys, path)  # complete: runs nothing
    assert rc == 0 and "running" not in out and "3/3 finished; this call ran 0" in out
    done = calls(tmp_path)
    assert sorted(c["x"] for c in done if c["event"] == "start") == ["1", "2", "3"]
    assert len({c["run_id"] for c in done}) == 3
    for c in done:  # the agent's environment: venv first on PATH, the parameters where wandb.init reads them
        assert os.path.dirname(c["python"]) == os.path.dirname(sys.executable)
        assert yaml.safe_load(Path(c["param_path"]).read_text())["x"] == {"value": int(c["x"])}
        assert c["argv"] == ["--sleep=0", f"--x={c['x']}"]
    state = state_of(tmp_path)
    assert [r["status"] for r in state["runs"]] == ["finished"] * 3
    logs = sorted(p.name for p in (tmp_path / "runs" / "sweeps").glob("*/*.log"))
    assert logs == ["000-x1.log", "001-x2.log", "002-x3.log"]


def test_a_failed_run_stops_the_runner_with_its_log(tmp_path, monkeypatch, capsys):
    path = make_sweep(tmp_path, {"x": {"values": [1, 2, 3]}, "fail_on": {"value": 2}})
    rc, out, err = cli(tmp_path, monkeypatch, capsys, path)
    assert rc == 1
    (line,) = err.strip().splitlines()
    assert "failed with exit code 3: boom: failing on purpose; command" in line and "prog.py --fail_on=2 --x=2" in line
    log = Path(line.rsplit("(log: ", 1)[1].rstrip(")"))
    assert log.name == "001-x2.log" and "boom: failing on purpose" in log.read_text()
    assert [c["x"] for c in calls(tmp_path) if c["event"] == "start"] == ["1", "2"]  # x=3 never started
    rc, out, err = cli(tmp_path, monkeypatch, capsys, path, "--keep-going")  # retries x=2, then runs x=3
    assert rc == 1 and "2/3 finished" in out and "1 failed" in out
    assert [c["x"] for c in calls(tmp_path) if c["event"] == "end"] == ["1", "3"]
    assert [r["status"] for r in state_of(tmp_path)["runs"]] == ["finished", "failed", "finished"]


def test_user_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    cases = {
        "broken.yaml": ("method: grid\nparameters: [unclosed\n", "not valid YAML"),
        "schema.yaml": ("program: prog.py\nparameters:\n  x:\n    value: 1\n", "'method' is a required"),
        "unknown.yaml": (yaml.safe_dump({"program": "train.py", "method": "grid",
                                         "parameters": {"seeed": {"values": [0, 1]}}}), "--seeed"),
        "string.yaml": ("program: distill.py\nmethod: grid\nparameters:\n  weight_decay:\n    value: 1e-5\n",
                        "is a string in YAML"),
        "continuous.yaml": (yaml.safe_dump({"program": "prog.py", "method": "grid",
                                            "parameters": {"lr": {"min": 0.1, "max": 1.0}}}), "grid"),
    }
    (tmp_path / "prog.py").write_text(PROGRAM)
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        rc, out, err = cli(tmp_path, monkeypatch, capsys, name)
        assert rc == 2, (name, err)
        (line,) = err.strip().splitlines()
        assert line.startswith("error: ") and needle in line, (name, line)
        assert out == ""
    assert "rename it to --seed" in cli(tmp_path, monkeypatch, capsys, "unknown.yaml")[2]
    assert not (tmp_path / "runs").exists()


def test_malformed_spec_exits_2_from_the_command_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("method: grid\nparameters: {x: [1\n")
    proc = spawn(tmp_path, "bad.yaml")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert len(err.strip().splitlines()) == 1 and "not valid YAML" in err


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_run_cut_off_by_sigkill_is_rerun_with_the_same_run_id(tmp_path):
    path = make_sweep(tmp_path, {"x": {"values": [1, 2, 3]}, "sleep": {"value": 0.2}, "slow_x": {"value": 2},
                                 "first_sleep": {"value": 60}})
    first = spawn(tmp_path, path.name)
    wait_for(lambda: any(c["event"] == "start" and c["x"] == "2" for c in calls(tmp_path)))
    wait_for(lambda: state_of(tmp_path)["runs"][1].get("pgid"))
    first.send_signal(signal.SIGKILL)  # the runner dies; its orphaned program goes on
    first.communicate(timeout=30)
    second = spawn(tmp_path, path.name)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "cut off" in err and "3/3 finished" in out
    events = calls(tmp_path)
    for x in ("1", "2", "3"):
        assert sum(c["event"] == "end" and c["x"] == x for c in events) == 1
    twos = [c for c in events if c["x"] == "2"]
    assert [c["event"] for c in twos] == ["start", "term", "start", "end"]  # stopped before the rerun began
    assert len({c["run_id"] for c in twos}) == 1  # the W&B run continues
    runs = state_of(tmp_path)["runs"]
    assert [r["status"] for r in runs] == ["finished"] * 3
    assert [r["attempts"] for r in runs] == [1, 2, 1]


def test_two_runners_never_run_the_same_config(tmp_path):
    path = make_sweep(tmp_path, {"x": {"values": list(range(6))}, "sleep": {"value": 0.5}})
    runners = [spawn(tmp_path, path.name) for _ in range(2)]
    results = [r.communicate(timeout=120) for r in runners]
    assert [r.returncode for r in runners] == [0, 0], results
    events = calls(tmp_path)
    for x in map(str, range(6)):
        assert [c["event"] for c in events if c["x"] == x] == ["start", "end"]
    assert [r["status"] for r in state_of(tmp_path)["runs"]] == ["finished"] * 6


def claimed_elsewhere(tmp_path, monkeypatch, capsys, slurm: dict | None) -> Path:
    """A grid of two whose first run is held by a runner on another machine (under SLURM: ``slurm``)."""
    path = make_sweep(tmp_path, {"x": {"values": [1, 2]}})
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    rc, _, err = cli(tmp_path, monkeypatch, capsys, path, "--count", "1")
    assert rc == 0, err
    (state_path,) = (tmp_path / "runs" / "sweeps").glob("*/state.json")
    state = json.loads(state_path.read_text())
    state["runs"][0].update(status="running", host="other-node", pid=1, pid_start=1, pgid=1, slurm=slurm)
    state_path.write_text(json.dumps(state))
    return path


@pytest.mark.parametrize("job,restart,taken", [("7", "1", True), ("7", "0", False), ("8", "1", False)])
def test_under_slurm_a_run_held_by_an_earlier_start_of_the_same_job_is_taken_over(tmp_path, monkeypatch, capsys,
                                                                                   job, restart, taken):
    """A requeued SLURM job starts again from the top, maybe on other nodes: a claim by its earlier start (which
    SLURM ended before starting it again) is resumed; a claim by this start, or by another job, is left alone."""
    path = claimed_elsewhere(tmp_path, monkeypatch, capsys, {"job": "7", "restart": 0})
    monkeypatch.setenv("SLURM_JOB_ID", job)
    monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
    rc, out, err = cli(tmp_path, monkeypatch, capsys, path)
    assert rc == 0, err
    first, second = state_of(tmp_path)["runs"]
    assert second["status"] == "finished" and second["slurm"] == {"job": job, "restart": int(restart)}
    if taken:
        assert first["status"] == "finished" and first["attempts"] == 2 and "2/2 finished" in out
    else:
        assert first["status"] == "running" and first["host"] == "other-node"
        assert "1 running in other runners (000-x1: pid 1 on other-node)" in out
    assert "cut off" not in err  # another host's process group is never looked for here


def test_without_slurm_a_run_held_on_another_machine_is_left_to_it(tmp_path, monkeypatch, capsys):
    path = claimed_elsewhere(tmp_path, monkeypatch, capsys, None)
    rc, out, err = cli(tmp_path, monkeypatch, capsys, path)
    assert rc == 0, err
    assert [r["status"] for r in state_of(tmp_path)["runs"]] == ["running", "finished"]


def test_runs_do_not_share_the_runners_wandb_service(tmp_path, monkeypatch):
    """As `wandb agent` does: WANDB_SERVICE is not passed on, so each run has its own wandb-core, which dies with
    it; a shared one outlives a killed run and keeps its run id "in use" when the run is rerun."""
    monkeypatch.setenv("WANDB_SERVICE", "3-1234-tcp-localhost-5678")
    spec = sweep_spec.load_spec(make_sweep(tmp_path, {"x": {"values": [1]}}))
    (tmp_path / "state").mkdir()
    env = sweep_runner.Runner(spec, tmp_path / "state", tmp_path, None, False).child_env(
        {"run_id": "r1", "config": spec.grid[0]})
    assert "WANDB_SERVICE" not in env and env["WANDB_RUN_ID"] == "r1"


def test_a_preempted_run_is_rerun_at_once_with_the_same_run_id(tmp_path, monkeypatch, capsys):
    """Exit 143 (the program checkpointed on a SIGTERM from outside: a preemption) is rerun in the same call, under
    the same W&B run id, as W&B's agent reruns a run its program marked preempting."""
    path = make_sweep(tmp_path, {"x": {"values": [1, 2, 3]}, "preempt_x": {"value": 2}})
    rc, out, err = cli(tmp_path, monkeypatch, capsys, path)
    assert rc == 0, err
    assert "3/3 finished" in out and "[2/3] running prog.py --x=2 [attempt 2]" in out
    (line,) = [ln for ln in err.splitlines() if "preempted" in ln]
    assert line.startswith("run 001-x2 was preempted (exit 143")
    twos = [c for c in calls(tmp_path) if c["x"] == "2"]
    assert [c["event"] for c in twos] == ["start", "preempted", "start", "end"]
    assert len({c["run_id"] for c in twos}) == 1 and twos[0]["run_id"] in line
    runs = state_of(tmp_path)["runs"]
    assert [r["status"] for r in runs] == ["finished"] * 3
    assert [r["attempts"] for r in runs] == [1, 2, 1] and runs[1]["preempted"] is True


def test_sigterm_reaches_the_program_through_the_launcher(tmp_path):
    """The specs' command: the runner's SIGTERM goes to the launcher, which passes it on to the program's own process
    group; the program checkpoints (here: logs "term") and exits 143; run again, the run finishes, same run id."""
    path = make_sweep(tmp_path, {"x": {"values": [1]}, "slow_x": {"value": 1}, "first_sleep": {"value": 60},
                                 "flag": {"value": True}}, command=LAUNCH)
    first = spawn(tmp_path, path.name)
    wait_for(lambda: any(c["event"] == "start" for c in calls(tmp_path)))
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 143, err
    assert "stopped by SIGTERM" in err
    (run,) = state_of(tmp_path)["runs"]
    assert run["status"] == "interrupted" and run["returncode"] == 143
    assert run["argv"][:5] == ["/usr/bin/env", "python", "-m", "kd.sweep.launch", "prog.py"]
    log = next((tmp_path / "runs" / "sweeps").glob(f"*/{run['log']}")).read_text()
    assert "kd.sweep.launch: SIGTERM: passing SIGTERM to the run's process group" in log
    start, term = calls(tmp_path)
    assert term["event"] == "term"
    assert start["pgid"] == start["pid"] != run["pgid"] == start["ppid"]  # its own group, the launcher's child
    assert start["argv"] == ["--first_sleep=60", "--flag=True", "--slow_x=1", "--x=1"]  # unchanged
    second = spawn(tmp_path, path.name)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0 and "1/1 finished" in out, err
    assert [c["event"] for c in calls(tmp_path)] == ["start", "term", "start", "end"]
    assert len({c["run_id"] for c in calls(tmp_path)}) == 1


def test_a_spec_runs_only_the_repositorys_entry_points(tmp_path, monkeypatch, capsys):
    """A file named train.py elsewhere, another program, or a command that bypasses the program: refused, one line."""
    (tmp_path / "train.py").write_text("raise SystemExit('must never run')\n")
    cases = {
        "copy.yaml": ({"program": "train.py"}, f"program train.py is {tmp_path.resolve() / 'train.py'}, not this "
                                               "repository's entry point"),
        "shell.yaml": ({"program": "/bin/sh"}, "program /bin/sh is not in this repository's entry points: a sweep "
                                               "runs distill.py or "),  # (or prog.py, here)
        "command.yaml": ({"program": "prog.py", "command": ["${env}", "/bin/sh", "-c", "touch pwned"]},
                         "does not run the program the way a sweep here may: write `command: [${env}, "
                         "${interpreter}, -m, kd.sweep.launch, ${program}, ${args}]`"),
        "envvar.yaml": ({"program": "prog.py", "command": ["${env}", "${envvar:SHELL}", "${program}"]},
                        "does not run the program"),
        "accelerate.yaml": ({"program": "prog.py", "command": ["${env}", "accelerate", "launch", "${program}",
                                                               "${args}"]}, "does not run the program"),
    }
    (tmp_path / "prog.py").write_text(PROGRAM)
    for name, (fields_, needle) in cases.items():
        spec = {"method": "grid", "parameters": {"seed": {"values": [0]}}, **fields_}
        (tmp_path / name).write_text(yaml.safe_dump(spec))
        rc, out, err = cli(tmp_path, monkeypatch, capsys, name)
        (line,) = err.strip().splitlines()
        assert rc == 2 and line.startswith("error: ") and needle in line, (name, line)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "pwned").exists() and calls(tmp_path) == []


def test_yaml_aliases_are_bounded(tmp_path, monkeypatch, capsys):
    """Anchors that expand a little are fine; a billion-laughs spec is refused in milliseconds, before W&B's engine
    (or json.dumps) walks its 10**9 values; so are a recursive alias and an oversized file."""
    ok = "base: &x [1, 2]\nprogram: prog.py\nmethod: grid\nparameters:\n  x:\n    values: *x\n"
    (tmp_path / "prog.py").write_text(PROGRAM)
    (tmp_path / "ok.yaml").write_text(ok)
    assert len(sweep_spec.Spec(tmp_path / "ok.yaml", yaml.safe_load(ok)).config["parameters"]["x"]["values"]) == 2
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = "\n".join(lines) + "\nprogram: prog.py\nmethod: grid\nparameters:\n  x:\n    values: *a8\n"
    (tmp_path / "bomb.yaml").write_text(bomb)
    (tmp_path / "loop.yaml").write_text("program: prog.py\nmethod: grid\nparameters: &p\n  x: *p\n")
    (tmp_path / "big.yaml").write_text("# " + "x" * (1 << 20) + "\nprogram: prog.py\n")
    for name, needle in (("bomb.yaml", "its YAML aliases expand to over 100,000 values"),
                         ("loop.yaml", "a YAML alias refers to itself"), ("big.yaml", "is over 1 MiB")):
        t0 = time.monotonic()
        rc, out, err = cli(tmp_path, monkeypatch, capsys, name)
        assert time.monotonic() - t0 < 1.0, name
        (line,) = err.strip().splitlines()
        assert rc == 2 and needle in line, (name, line)
    assert not (tmp_path / "runs").exists()
