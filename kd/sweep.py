"""Run a W&B sweep spec offline: the stand-in for ``wandb sweep`` + ``wandb agent`` where no server is.

    python -m kd.sweep sweeps/demo/teachers.yaml               # run every run of the grid, here
    python -m kd.sweep sweeps/demo/teachers.yaml --dry-run     # print each run's command, run nothing
    python -m kd.sweep SPEC.yaml --count 2 --keep-going --state-dir DIR

The spec is the YAML that ``wandb sweep`` takes, unchanged. W&B's own pieces do the work wherever they can:
``sweeps.schema_violations_from_proposed_config`` validates the spec, ``sweeps.next_run`` (W&B's sweep
engine) proposes the runs, and ``create_sweep_command`` / ``create_sweep_command_args`` from
``wandb.sdk.launch.sweeps.utils`` format the command exactly as ``wandb agent`` does (``--key=value``,
booleans as ``True``/``False``, the same ``${...}`` macros). Each run is a child process started in the
repository root (the folder that holds the spec's ``program``) with the virtualenv's ``bin`` first on PATH.

Exported to each run, as the agent does: ``WANDB_RUN_ID`` (fresh per run, the same again when a cut-off run
is rerun, so the W&B run continues), ``WANDB_SWEEP_PARAM_PATH`` (the run's parameters, the agent's YAML),
``WANDB_DIR`` (the root, if unset), ``WANDB_PROJECT``/``WANDB_ENTITY`` (if the spec names them). Not
exported: ``WANDB_SWEEP_ID``. With it set, ``wandb.init`` ignores the project and run id the program asks for,
and ``wandb sync`` of the offline run fails on the server ("sweep ... not found"), since no server knows a
local sweep. The local sweep id is exported as ``KD_SWEEP_ID`` instead.

State: ``runs/sweeps/<spec-stem>-<sha8>/state.json`` (``--state-dir`` to override), under an fcntl lock, so
several runners can share one spec: a run is claimed (status running, pid, host, start time) before it
starts and marked finished or failed after. Started again, a runner skips finished runs, retries failed ones
and reruns runs whose runner died (the programs resume from their own checkpoints). Each run's output goes to
``<run-key>.log`` beside the state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import difflib
import fcntl
import hashlib
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import yaml

from kd import faults
from kd.config import DistillConfig, TrainConfig, parse_flags
from kd.errors import ArgumentParser, KDError

PROGRAMS = {"train.py": TrainConfig, "distill.py": DistillConfig}
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # the agent's default
GRID_LIMIT = 100_000  # the most runs a grid may hold here
TERM_GRACE_S = 60.0  # a killed run's program gets this long to write its checkpoint
STATE_VERSION = 1


def _sweeps():
    """W&B's sweep engine; its import warns about pydantic v2 renames, which are not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Valid config keys have changed in V2", UserWarning)
        warnings.filterwarnings("ignore", "Support for class-based `config` is deprecated")
        import sweeps
    return sweeps


# ------------------------------------------------------------------------------------------------ spec
class Spec:
    """A validated sweep spec and what follows from it: the program, its flag class, the grid."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        self.config = config
        self.program: str = config.get("program") or ""
        self.method: str = config["method"]
        self.command: list = list(config.get("command") or DEFAULT_COMMAND)
        self.sha = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
        self.sweep_id = f"{path.stem}-{self.sha[:8]}"
        self.flags_cls = PROGRAMS.get(Path(self.program).name)
        self.grid: list[dict] | None = None  # every run of a grid, in the engine's order

    def varying(self) -> list[str]:
        """Parameters that differ between runs (shown in progress lines and run keys)."""
        out = []
        for name, p in self.config["parameters"].items():
            if isinstance(p, dict) and ("value" not in p) and not (len(p.get("values", [])) == 1):
                out.append(name)
        return sorted(out)

    def total(self, count: int | None) -> int | None:
        n = len(self.grid) if self.grid is not None else self.config.get("run_cap")
        if count is not None:
            n = count if n is None else min(n, count)
        return n


def load_spec(path: str | Path) -> Spec:
    """Read, validate and (for grids) enumerate a spec; every problem is one KDError naming the fix."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KDError(f"no sweep spec at {path}: pass a YAML file, e.g. sweeps/demo/teachers.yaml") from None
    except IsADirectoryError:
        raise KDError(f"{path} is a folder: pass one spec file, e.g. {path}/teachers.yaml") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise KDError(f"{path} is not valid YAML ({problem}{where}): fix the syntax") from None
    if not isinstance(config, dict):
        raise KDError(f"{path} holds a {type(config).__name__}, not a sweep spec: write a mapping with "
                      "method, parameters, program and command")
    violations = _sweeps().schema_violations_from_proposed_config(config)
    if violations:
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise KDError(f"{path} is not a valid W&B sweep spec: {violations[0]}{more}: fix the spec "
                      "(https://docs.wandb.ai/guides/sweeps/sweep-config-keys)")
    spec = Spec(path, config)
    if not spec.program:
        raise KDError(f"{path} has no program: add e.g. `program: train.py`")
    if spec.method not in ("grid", "random"):
        raise KDError(f"{path}: method {spec.method} needs the metric of finished runs, which this offline "
                      "runner does not read: use method grid or random here, or the W&B agent online")
    if not all(isinstance(c, (str, int, float)) for c in spec.command):
        raise KDError(f"{path}: every command item must be one word (a string), got {spec.command!r}")
    _check_flags(spec)
    if spec.method == "grid":
        spec.grid = _enumerate_grid(spec)
        _check_values(spec)
    return spec


def _check_flags(spec: Spec) -> None:
    if spec.flags_cls is None:  # not one of ours: its flags are its own business
        return
    known = {f.name: f for f in dataclasses.fields(spec.flags_cls)}
    unknown = [name for name in spec.config["parameters"] if name not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"rename it to --{close[0]}" if close else "remove it"
        others = f" (nor {', '.join('--' + u for u in unknown[1:])})" if unknown[1:] else ""
        raise KDError(f"{spec.path}: {spec.program} has no flag --{unknown[0]}{others}: {hint} "
                      f"(the flags: python {spec.program} --help)")
    for name, p in spec.config["parameters"].items():
        numeric = known[name].type in ("int", "float", int, float)
        values = (p.get("values", []) + ([p["value"]] if "value" in p else [])) if isinstance(p, dict) else []
        for value in values:
            if numeric and isinstance(value, str):
                raise KDError(f"{spec.path}: {name} value {value!r} is a string in YAML (PyYAML reads 1e-5 "
                              "as text): write the number with a dot, e.g. 1.0e-5")


def _enumerate_grid(spec: Spec) -> list[dict]:
    try:
        runs = _sweeps().next_runs(spec.config, [], validate=False, n=GRID_LIMIT)
    except ValueError as e:
        raise KDError(f"{spec.path}: W&B's grid search refuses the spec ({e}): use `values` or `value` "
                      "for every parameter of a grid") from None
    grid = [r.config for r in runs if r is not None]
    if len(grid) >= GRID_LIMIT:
        raise KDError(f"{spec.path}: the grid holds {GRID_LIMIT} runs or more: split it into smaller sweeps")
    return grid


def _check_values(spec: Spec) -> None:
    """Each run's flags through the program's own parser: a wrong type or value fails now, not at run 40."""
    if spec.flags_cls is None:
        return
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    for config in spec.grid or []:
        args = create_sweep_command_args({"args": config})["args"]
        try:
            parse_flags(spec.flags_cls, args)
        except KDError as e:
            raise KDError(f"{spec.path}: the run {run_label(spec, config)} would fail: {e}") from None


def run_label(spec: Spec, config: dict) -> str:
    shown = spec.varying() or list(config)
    return " ".join(f"--{k}={config[k]['value']}" for k in shown if k in config) or "(no parameters)"


# ------------------------------------------------------------------------------------------ the command
def build_argv(spec: Spec, config: dict, args_json_file: str) -> list[str]:
    """The argv ``wandb agent`` builds for one run (wandb_agent.Agent._command_run, CLI branch), exactly."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    command = create_sweep_command(list(spec.command))  # ${envvar:NAME} from os.environ: the agent's own code
    sweep_vars = create_sweep_command_args({"args": config})
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [spec.program]
    sweep_vars["args_json_file"] = [args_json_file]
    if platform.system() != "Windows":
        sweep_vars["env"] = ["/usr/bin/env"]
    argv: list[str] = []
    for c in command:
        c = str(c)
        if c.startswith("${") and c.endswith("}"):
            argv += sweep_vars.get(c[2:-1]) or []
        else:
            argv += [c]
    return argv


def find_root(spec: Spec) -> Path | None:
    """The folder that holds the program: the working directory, else the spec's folder or one above it."""
    for folder in [Path.cwd(), spec.path.resolve().parent, *spec.path.resolve().parent.parents]:
        if (folder / spec.program).is_file():
            return folder
    return None


def new_run_id() -> str:
    from wandb.sdk.lib import runid

    return runid.generate_id()


# ------------------------------------------------------------------------------------------------ state
class State:
    """state.json beside the runs' logs, read and written only under the fcntl lock of state.lock."""

    def __init__(self, folder: Path, spec: Spec):
        self.folder = folder
        self.spec = spec
        self.path = folder / "state.json"
        self.lock_path = folder / "state.lock"

    @contextlib.contextmanager
    def locked(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                data = self._read()
                yield data
                from kd.io import write_json

                write_json(self.path, data)
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _read(self) -> dict:
        if not self.path.exists():
            return {"version": STATE_VERSION, "sweep_id": self.spec.sweep_id, "spec_sha256": self.spec.sha,
                    "spec_path": str(self.spec.path.resolve()), "spec": self.spec.config,
                    "created_at": _now(), "runs": []}
        from kd.io import read_json

        data = read_json(self.path)
        if data.get("spec_sha256") != self.spec.sha:
            raise KDError(f"{self.path} belongs to another spec ({data.get('spec_path')}): pass another "
                          "--state-dir, or delete that folder to start over")
        return data

    def peek(self) -> dict | None:
        """The state without the lock (dry runs; never written)."""
        if not self.path.exists():
            return None
        from kd.io import read_json

        return read_json(self.path)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, process group, start time in clock ticks) from /proc; None if there is no such pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    return rest[0], int(rest[2]), int(rest[19])


def process_start(pid: int) -> int | None:
    info = _proc_stat(pid) if Path("/proc/self/stat").exists() else None
    return info[2] if info else None


def pid_alive(pid: int, start: int | None) -> bool:
    """Whether ``pid`` still runs and is the same process (its start time matches; a zombie is dead)."""
    if Path("/proc/self/stat").exists():
        info = _proc_stat(pid)
        if info is None or info[0] in ("Z", "X"):
            return False
        return start is None or info[2] == start
    from kd.io import pid_exists

    return pid_exists(pid)


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process remains in the process group ``pgid``."""
    proc = Path("/proc")
    if (proc / "self" / "stat").exists():
        for entry in proc.iterdir():
            if entry.name.isdigit():
                info = _proc_stat(int(entry.name))
                if info and info[1] == pgid and info[0] not in ("Z", "X"):
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pgid: int, grace: float = TERM_GRACE_S) -> None:
    """SIGTERM a run's process group (the programs checkpoint on it), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if not group_alive(pgid):
            return
        with contextlib.suppress(ProcessLookupError):  # the group ended between the check and the signal
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(pgid):
            time.sleep(0.1)
    if group_alive(pgid):
        raise KDError(f"process group {pgid} of a cut-off run survives SIGKILL: stop it by hand, then rerun")


# ----------------------------------------------------------------------------------------------- runner
class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum, frame):
    raise _Stop(signum)


def fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Runner:
    def __init__(self, spec: Spec, state_dir: Path, root: Path, count: int | None, keep_going: bool):
        self.spec = spec
        self.state = State(state_dir, spec)
        self.root = root
        self.count = count
        self.keep_going = keep_going
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pid_start = process_start(self.pid)
        self.tried: set[str] = set()  # keys this runner attempted: a failed run is retried in the next call
        self.durations: list[float] = []
        self.ran = 0
        self.failed: list[dict] = []

    # -- claiming, under the lock
    def claim(self) -> tuple[dict, dict | None] | None:
        """The next run to do, marked running by this process; with the stale claim it replaces, if any."""
        with self.state.locked() as data:
            runs = data["runs"]
            pick, stale = None, None
            for r in runs:
                if r["key"] in self.tried:
                    continue
                if r["status"] == "running":
                    if r.get("host") != self.host or pid_alive(r["pid"], r.get("pid_start")):
                        continue  # another live runner owns it (or one on another host: left alone)
                    stale = dict(r)
                    pick = r
                    break
                if r["status"] in ("pending", "failed", "interrupted"):
                    pick = r
                    break
            if pick is None:
                pick = self._propose(runs)
                if pick is None:
                    return None
            pick.update(status="running", pid=self.pid, pid_start=self.pid_start, host=self.host,
                        started_at=_now(), ended_at=None, returncode=None, pgid=None,
                        attempts=pick.get("attempts", 0) + 1)
            pick.setdefault("run_id", None)
            pick["run_id"] = pick["run_id"] or new_run_id()
            json_file = str(self.params_path(pick["run_id"], ".json"))
            pick["argv"] = build_argv(self.spec, pick["config"], json_file)
            self.tried.add(pick["key"])
            position = sum(r["status"] in ("finished", "running") for r in runs)
            return {**pick, "_position": position}, stale

    def _propose(self, runs: list[dict]) -> dict | None:
        cap = self.spec.config.get("run_cap")
        if cap is not None and len(runs) >= cap:
            return None
        sweeps = _sweeps()
        done = [sweeps.SweepRun(name=r["key"], state=_engine_state(r["status"]), config=r["config"])
                for r in runs]
        proposed = sweeps.next_run(self.spec.config, done, validate=False)  # grid: the first config not held
        config = proposed.config if proposed is not None else None
        if config is None:
            return None
        slug = "_".join(f"{k}{config[k]['value']}" for k in self.spec.varying() if k in config)
        slug = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in slug)[:100]
        run = {"key": f"{len(runs):03d}" + (f"-{slug}" if slug else ""), "config": config,
               "params": {k: v["value"] for k, v in config.items()}, "status": "pending", "attempts": 0,
               "run_id": None}
        run["log"] = f"{run['key']}.log"
        runs.append(run)
        return run

    def update(self, key: str, **values) -> None:
        with self.state.locked() as data:
            for r in data["runs"]:
                if r["key"] == key:
                    r.update(values)
                    return
            raise KDError(f"run {key} vanished from {self.state.path}: was the file edited during the sweep?")

    def params_path(self, run_id: str, suffix: str) -> Path:
        return self.state.folder / f"config-{run_id}{suffix}"

    # -- one run
    def child_env(self, run: dict) -> dict:
        from wandb.sdk.lib import config_util

        env = dict(os.environ)
        venv_bin = os.path.dirname(sys.executable)
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        env.setdefault("WANDB_DIR", str(self.root))
        env["WANDB_RUN_ID"] = run["run_id"]
        param_path = self.params_path(run["run_id"], ".yaml")
        config_util.save_config_file_from_dict(str(param_path), run["config"])  # the agent's writer
        env["WANDB_SWEEP_PARAM_PATH"] = str(param_path)
        if "${args_json_file}" in self.spec.command:
            from kd.io import atomic_write

            with atomic_write(self.params_path(run["run_id"], ".json"), "w") as fh:
                fh.write(json.dumps({k: v["value"] for k, v in run["config"].items()}))
        for key in ("project", "entity"):
            if self.spec.config.get(key):
                env[f"WANDB_{key.upper()}"] = str(self.spec.config[key])
        env["KD_SWEEP_ID"] = self.spec.sweep_id
        env.pop("WANDB_SWEEP_ID", None)  # see the module docstring
        env.pop("WANDB_SERVICE", None)  # as the agent does: a run's own wandb-core dies with it, so a rerun of a
        # killed run can take its run id again (a shared one keeps the id "in use")
        return env

    def execute(self, run: dict) -> int:
        log_path = self.state.folder / run["log"]
        env = self.child_env(run)
        with open(log_path, "ab") as log:
            log.write(f"\n=== {_now()} attempt {run['attempts']} pid {self.pid} on {self.host}: "
                      f"{shlex.join(run['argv'])}\n".encode())
            log.flush()
            try:
                child = subprocess.Popen(run["argv"], cwd=self.root, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
            except OSError as e:
                log.write(f"could not start: {e}\n".encode())
                return 127
        try:
            self.update(run["key"], pgid=child.pid)
            return child.wait()
        except _Stop as stop:
            print(f"{stop}: stopping {run['key']} (its program checkpoints on SIGTERM)...", file=sys.stderr)
            stop_group(child.pid)
            child.wait()
            self.update(run["key"], status="interrupted", ended_at=_now(), returncode=child.returncode)
            raise

    def loop(self) -> int:
        total = self.spec.total(None)
        started = time.monotonic()
        shown = total if total is not None else "?"
        print(f"sweep {self.spec.sweep_id}: {shown} runs of {self.spec.program} in {self.root}; "
              f"state and logs in {self.state.folder}", flush=True)
        while self.count is None or self.ran < self.count:
            claimed = self.claim()
            if claimed is None:
                break
            run, stale = claimed
            if stale and stale.get("pgid") and group_alive(stale["pgid"]):
                print(f"run {run['key']} was cut off (runner pid {stale['pid']} is gone) but its program "
                      f"still runs: stopping process group {stale['pgid']} before rerunning", file=sys.stderr)
                stop_group(stale["pgid"])
            remaining = (total - run["_position"] + 1) if total is not None else None
            if self.count is not None:
                remaining = min(remaining or self.count, self.count - self.ran)
            eta = ""
            if self.durations and remaining is not None:
                eta = f" (eta {fmt_duration(sum(self.durations) / len(self.durations) * remaining)})"
            again = f" [attempt {run['attempts']}]" if run["attempts"] > 1 else ""
            print(f"[{run['_position']}/{total if total is not None else '?'}] running {self.spec.program} "
                  f"{run_label(self.spec, run['config'])}{again}{eta}", flush=True)
            t0 = time.monotonic()
            faults.point("sweep-claimed")  # claimed in the state, its program not started
            code = self.execute(run)
            faults.point("sweep-exited")  # the program ended, the state still says running
            took = time.monotonic() - t0
            self.durations.append(took)
            self.ran += 1
            status = "finished" if code == 0 else "failed"
            self.update(run["key"], status=status, returncode=code, ended_at=_now(),
                        duration_s=round(took, 3))
            if code != 0:
                log = self.state.folder / run["log"]
                print(f"error: run {run['key']} failed with exit code {code}: {shlex.join(run['argv'])} "
                      f"(log: {log})", file=sys.stderr, flush=True)
                self.failed.append(run)
                if not self.keep_going:
                    return 1
        return self.summary(time.monotonic() - started)

    def summary(self, took: float) -> int:
        data = self.state.peek() or {"runs": []}
        runs = data["runs"]
        done = sum(r["status"] == "finished" for r in runs)
        total = self.spec.total(None)
        elsewhere = [r for r in runs if r["status"] == "running"]
        failed = [r for r in runs if r["status"] == "failed"]
        parts = [f"sweep {self.spec.sweep_id}: {done}/{total if total is not None else len(runs)} finished",
                 f"this call ran {self.ran} in {fmt_duration(took)}"]
        if failed:
            logs = ", ".join(str(self.state.folder / r["log"]) for r in failed)
            parts.append(f"{len(failed)} failed ({logs})")
        if elsewhere:
            parts.append(f"{len(elsewhere)} running in other runners ("
                         + ", ".join(f"{r['key']}: pid {r['pid']} on {r['host']}" for r in elsewhere) + ")")
        print("; ".join(parts) + f"; state {self.state.path}", flush=True)
        return 1 if self.failed else 0


def _engine_state(status: str) -> str:
    return {"finished": "finished", "failed": "failed", "running": "running"}.get(status, "pending")


def never_ends(spec: Spec) -> str:
    return f"{spec.path}: method {spec.method} never ends: set run_cap in the spec or pass --count N"


def dry_run(spec: Spec, state_dir: Path, root: Path, count: int | None) -> int:
    state = State(state_dir, spec).peek()
    known = {json.dumps(r["config"], sort_keys=True): r for r in (state or {}).get("runs", [])}
    if spec.grid is not None:
        configs = spec.grid
    else:
        n = spec.total(count)
        if n is None:
            raise KDError(never_ends(spec))
        configs = [_sweeps().next_run(spec.config, [], validate=False).config for _ in range(n)]
    if count is not None:
        configs = configs[:count]
    folder = state_dir
    for config in configs:
        prior = known.get(json.dumps(config, sort_keys=True))
        run_id = (prior or {}).get("run_id") or new_run_id()
        print(shlex.join(build_argv(spec, config, str(folder / f"config-{run_id}.json"))))
    status = ""
    if state:
        finished = sum(r["status"] == "finished" for r in state["runs"])
        status = f", {finished} already finished"
    print(f"dry run: {len(configs)} runs of {spec.program} in {root}{status}; state: {folder}/state.json; "
          "nothing was run", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m kd.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="a W&B sweep spec (YAML), e.g. sweeps/demo/teachers.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print each run's command; run nothing")
    parser.add_argument("--count", type=int, default=None, help="run at most N runs, then stop")
    parser.add_argument("--keep-going", action="store_true", help="go on after a failed run (exit 1)")
    parser.add_argument("--state-dir", default=None, help="default: runs/sweeps/<stem>-<sha8>")
    args = parser.parse_args(argv)
    try:
        if args.count is not None and args.count < 1:
            raise KDError(f"--count must be >= 1, got {args.count}")
        spec = load_spec(args.spec)
        root = find_root(spec)
        if root is None:
            if not args.dry_run:
                raise KDError(f"program {spec.program} is not in {Path.cwd()} nor in or above the spec's "
                              "folder: run from the folder that holds it")
            root = Path.cwd()
        state_dir = Path(args.state_dir) if args.state_dir else root / "runs" / "sweeps" / spec.sweep_id
        state_dir = state_dir.resolve()
        if args.dry_run:
            return dry_run(spec, state_dir, root, args.count)
        if spec.grid is None and spec.total(args.count) is None:
            raise KDError(never_ends(spec))
        runner = Runner(spec, state_dir, root, args.count, args.keep_going)
        previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
        try:
            return runner.loop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    except KDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _Stop as stop:
        print(f"stopped by {stop}: run the same command again to go on", file=sys.stderr)
        return 128 + stop.signum


if __name__ == "__main__":
    raise SystemExit(main())
