"""``python -m kd.sweep SPEC.yaml [--dry_run] [--count N] [--keep_going] [--state_dir DIR]``: the command line.

A user error is one line (``error: ...``) and exit code 2 with nothing written; a SIGTERM, SIGINT or SIGHUP
stops the current run (its program checkpoints), notes it interrupted and exits 128 + the signal number.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from kd.errors import Interrupted, KDError, one_line
from kd.flags import REQUIRED, parse_flags, setting
from kd.sweep.runner import Runner, raise_stop
from kd.sweep.spec import Spec, build_argv, check_program_file, find_root, load_spec, sweeps_engine
from kd.sweep.state import State
from kd.wandb_runs import new_run_id

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


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
        configs = [sweeps_engine().next_run(spec.config, [], validate=False).config for _ in range(n)]
    if count is not None:
        configs = configs[:count]
    for config in configs:
        prior = known.get(json.dumps(config, sort_keys=True))
        run_id = (prior or {}).get("run_id") or new_run_id()
        print(shlex.join(build_argv(spec, config, str(state_dir / f"config-{run_id}.json"))))
    status = ""
    if state:
        finished = sum(r["status"] == "finished" for r in state["runs"])
        status = f", {finished} already finished"
    print(f"dry run: {len(configs)} runs of {spec.program} in {root}{status}; state: {state_dir}/state.json; "
          "nothing was run", file=sys.stderr)
    return 0


@dataclass
class SweepSettings:
    """python -m kd.sweep SPEC: run a W&B sweep spec offline, the stand-in for `wandb sweep` + `wandb agent`."""

    spec: str = setting(REQUIRED, "a W&B sweep spec (YAML), e.g. sweeps/demo/teachers.yaml", positional=True)
    dry_run: bool = setting(False, "print each run's command; run nothing", choices=(True, False))
    count: int = setting(0, "run at most N runs, then stop; 0: every run", lo=0, hi=10**9)
    keep_going: bool = setting(False, "go on after a failed run (exit 1)", choices=(True, False))
    state_dir: str = setting("", "state and logs; empty: runs/sweeps/<stem>-<sha8>")


def run(args: SweepSettings) -> int:
    spec = load_spec(args.spec)
    root = find_root(spec)
    if root is None:
        if not args.dry_run:
            raise KDError(f"program {spec.program} is not in {Path.cwd()} nor in or above the spec's "
                          "folder: run from the folder that holds it")
        root = Path.cwd()
    else:
        check_program_file(spec, root)
    state_dir = Path(args.state_dir) if args.state_dir else root / "runs" / "sweeps" / spec.sweep_id
    state_dir = state_dir.resolve()
    count = args.count or None
    if args.dry_run:
        return dry_run(spec, state_dir, root, count)
    if spec.grid is None and spec.total(count) is None:
        raise KDError(never_ends(spec))
    runner = Runner(spec, state_dir, root, count, args.keep_going)
    previous = {s: signal.signal(s, raise_stop) for s in STOP_SIGNALS}
    try:
        return runner.loop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_flags(SweepSettings, argv))
    except KDError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"stopped by {stop}: run the same command again to go on", file=sys.stderr)
        return 128 + stop.signum
