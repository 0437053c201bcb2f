"""A sweep spec, checked before anything runs: W&B's schema, the program, its command, every run's flags.

The spec is the YAML that ``wandb sweep`` takes, unchanged. W&B's own pieces do the work wherever they can:
``sweeps.schema_violations_from_proposed_config`` validates it, ``sweeps.next_runs`` (W&B's sweep engine)
enumerates a grid, and ``create_sweep_command`` / ``create_sweep_command_args`` from
``wandb.sdk.launch.sweeps.utils`` format each run's command exactly as ``wandb agent`` does.

A spec cannot run anything but this repository's entry points (:data:`ENTRY_POINTS`: train.py, distill.py),
and only through a command of the forms :func:`check_command` lists (an interpreter, optionally the
launcher ``-m kd.sweep.launch``, the program, its arguments).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import platform
import warnings
from pathlib import Path

from kd.config import DistillConfig, TrainConfig
from kd.errors import KDError
from kd.flags import parse_flags
from kd.sweep.specfile import read_spec_file

REPO = Path(__file__).resolve().parents[2]
# the only programs a sweep runs, each with its flag class
ENTRY_POINTS: dict[Path, type | None] = {REPO / "train.py": TrainConfig, REPO / "distill.py": DistillConfig}
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # the agent's default
LAUNCH_COMMAND = ["${env}", "${interpreter}", "-m", "kd.sweep.launch", "${program}", "${args}"]
ARG_MACROS = {"${args}", "${args_no_hyphens}", "${args_no_boolean_flags}", "${args_no_equals}", "${args_json}",
              "${args_json_file}"}
INTERPRETERS = {"${interpreter}", "python", "python3"}
GRID_LIMIT = 100_000  # the most runs a grid may hold here


def sweeps_engine():
    """W&B's sweep engine; its import warns about pydantic v2 renames, which are not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Valid config keys have changed in V2", UserWarning)
        warnings.filterwarnings("ignore", "Support for class-based `config` is deprecated")
        import sweeps
    return sweeps


def allowed_names() -> str:
    return " or ".join(sorted(p.name for p in ENTRY_POINTS))


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
        by_name = {p.name: cls for p, cls in ENTRY_POINTS.items()}
        self.flags_cls = by_name.get(Path(str(self.program)).name)
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
    config = read_spec_file(path)
    if not isinstance(config, dict):
        raise KDError(f"{path} holds a {type(config).__name__}, not a sweep spec: write a mapping with "
                      "method, parameters, program and command")
    violations = sweeps_engine().schema_violations_from_proposed_config(config)
    if violations:
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise KDError(f"{path} is not a valid W&B sweep spec: {violations[0]}{more}: fix the spec "
                      "(https://docs.wandb.ai/guides/sweeps/sweep-config-keys)")
    spec = Spec(path, config)
    if not spec.program:
        raise KDError(f"{path} has no program: add e.g. `program: train.py`")
    if Path(str(spec.program)).name not in {p.name for p in ENTRY_POINTS}:
        raise KDError(f"{path}: program {spec.program} is not in this repository's entry points: a sweep runs "
                      f"{allowed_names()} (of {REPO}) only")
    if spec.method not in ("grid", "random"):
        raise KDError(f"{path}: method {spec.method} needs the metric of finished runs, which this offline "
                      "runner does not read: use method grid or random here, or the W&B agent online")
    check_command(spec)
    check_flags(spec)
    if spec.method == "grid":
        spec.grid = enumerate_grid(spec)
        check_values(spec)
    return spec


def check_command(spec: Spec) -> None:
    """[${env}] interpreter [-m kd.sweep.launch] ${program} followed by argument macros only."""
    if not all(isinstance(c, (str, int, float)) for c in spec.command):
        raise KDError(f"{spec.path}: every command item must be one word (a string), got {spec.command!r}")
    words = [str(c) for c in spec.command]
    rest = words[1:] if words[:1] == ["${env}"] else words
    ok = bool(rest) and rest[0] in INTERPRETERS
    rest = rest[1:]
    if rest[:2] == ["-m", "kd.sweep.launch"]:
        rest = rest[2:]
    if not (ok and rest[:1] == ["${program}"] and all(w in ARG_MACROS for w in rest[1:])):
        raise KDError(f"{spec.path}: the command {' '.join(words)} does not run the program the way a sweep "
                      f"here may: write `command: [{', '.join(LAUNCH_COMMAND)}]` (the launcher that passes "
                      "stop signals on), or leave it out (W&B's default)")


def check_flags(spec: Spec) -> None:
    if spec.flags_cls is None:  # a test's stand-in program: its flags are its own business
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


def enumerate_grid(spec: Spec) -> list[dict]:
    try:
        runs = sweeps_engine().next_runs(spec.config, [], validate=False, n=GRID_LIMIT)
    except ValueError as e:
        raise KDError(f"{spec.path}: W&B's grid search refuses the spec ({e}): use `values` or `value` "
                      "for every parameter of a grid") from None
    grid = [r.config for r in runs if r is not None]
    if len(grid) >= GRID_LIMIT:
        raise KDError(f"{spec.path}: the grid holds {GRID_LIMIT} runs or more: split it into smaller sweeps")
    return grid


def check_values(spec: Spec) -> None:
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


def find_root(spec: Spec) -> Path | None:
    """The folder that holds the program: the working directory, else the spec's folder or one above it."""
    for folder in [Path.cwd(), spec.path.resolve().parent, *spec.path.resolve().parent.parents]:
        if (folder / spec.program).is_file():
            return folder
    return None


def check_program_file(spec: Spec, root: Path) -> None:
    """The program found in ``root`` must be the repository's own entry point, not a file of that name."""
    found = (root / spec.program).resolve()
    if found not in {p.resolve() for p in ENTRY_POINTS}:
        raise KDError(f"{spec.path}: program {spec.program} is {found}, not this repository's entry point: a "
                      f"sweep runs {allowed_names()} of {REPO} only (run from that folder)")


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
