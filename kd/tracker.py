"""The W&B run of one run: the one place a W&B run is started, logged to and ended.

Every trainer (teacher, student, packed students, generators) and the pool generator use a :class:`Tracker`.
It lives on the main process only: on the others (and with ``WANDB_MODE=disabled``) every call does nothing,
so a non-main process never touches W&B. Several trackers may be open in one process (a packed grid has one
W&B run per member): each holds its own run (``reinit="create_new"``).

* ``start``: a new run, or the same run again (``resume="allow"`` with the run folder's id); a W&B failure is
  one line naming the fix.
* ``replay``: rows a killed process logged but W&B lost are logged again, and only those (W&B drops a step
  that goes back, and a resumed offline run starts a second folder of the same id).
* ``end``: a run stopped by SIGTERM (exit 143: a scheduler's preemption, a cancelled sweep) is marked preempting
  first, so W&B's agent (and ``python -m kd.sweep``) reruns it and it resumes; a run stopped by SIGINT (exit 130:
  Ctrl-C, or a stop from the W&B UI, which the SDK delivers as SIGINT) ends as stopped and is not rerun; a
  failed run ends with its exit code. A stop or a failure whose W&B service is gone already (SLURM's own stop and
  a cancel signal every process, W&B's service process too, which may exit first) is one warning line, and the
  process keeps its exit code (143 stays a preemption); a normal end that W&B does not take is one error line
  (exit 2), and the run is not marked done, so the same command finishes it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from kd import wandb_runs
from kd.errors import Interrupted, KDError, first_line
from kd.wandb_runs import announce_mode, last_logged_step, wandb_dir, wandb_mode


def unlocked(config: dict) -> dict:
    """The config without the keys of ``$WANDB_SWEEP_PARAM_PATH`` (a sweep agent's parameters, or the offline
    runner's): wandb.init locks them whenever that file is set, and warns once per key otherwise; the values are
    the same, parsed from the same command line."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not os.path.exists(path):
        return config
    import yaml

    with open(path) as fh:
        locked = set((yaml.safe_load(fh) or {}).keys())
    return {k: v for k, v in config.items() if k not in locked}


class Tracker:
    def __init__(self, main: bool = True, mode: str | None = None):
        self.main = main
        self.mode = mode or wandb_mode()
        self.run = None
        self.run_id = ""
        self.seen = 0  # the highest step the W&B run already held when it was (re)started
        self._ended = False

    @property
    def active(self) -> bool:
        return self.run is not None

    def announce(self, file=None) -> None:
        if self.main:
            print(announce_mode(self.mode), file=file or sys.stdout, flush=True)

    def start(self, *, project: str, run_id: str, name: str, config: dict, job_type: str, group: str | None = None,
              tags: list[str] | None = None) -> None:
        """Start (or continue) the W&B run ``run_id``; nothing on a non-main process or with W&B disabled."""
        self.run_id, self._ended = run_id, False
        if not self.main or self.mode == "disabled":
            return
        import wandb

        if self.mode == "online":
            wandb_runs.check_reachable()
        try:
            self.run = wandb.init(project=project, id=run_id, resume="allow", name=name, group=group,
                                  job_type=job_type, mode=self.mode, tags=tags, dir=wandb_dir(), reinit="create_new")
            self.run.config.update(unlocked(config), allow_val_change=True)  # as Accelerate's tracker stores it
        except (wandb.errors.Error, ValueError, OSError) as e:
            why = first_line(e)
            raise KDError(f"cannot start the W&B run {name} in project {project} ({why}): check `wandb login`, "
                          "the project name and the network, or run offline with WANDB_MODE=offline") from None
        self.seen = last_logged_step(self.run, self.mode)

    def update_config(self, values: dict) -> None:
        if self.run is not None:
            self.run.config.update(unlocked(values), allow_val_change=True)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def replay(self, rows: list[tuple[int, dict]]) -> None:
        """Log the (step, metrics) rows that the W&B run does not hold yet."""
        for step, row in rows:
            if step > self.seen:
                self.log(row, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def image(self, key: str, path: Path, step: int) -> None:
        if self.run is not None and step > self.seen:
            import wandb

            self.log({key: wandb.Image(str(path))}, step=step)

    def where(self) -> str:
        if self.run is None:
            return "W&B: disabled" if self.mode == "disabled" or self.main else "W&B: on the main process"
        return f"W&B run {self.run_id} ({self.mode}): {Path(self.run.dir).parent}"

    def end(self, exit_code: int = 0) -> None:
        """Finish the W&B run (waits for its uploads); idempotent."""
        if self._ended:
            return
        self._ended = True
        if self.run is None:
            return
        try:
            if exit_code == 143:  # SIGTERM: preempted, to be rerun; SIGINT (Ctrl-C, or a W&B UI stop): stopped
                self.run.mark_preempting()
            self.run.finish(exit_code=exit_code or None)
        except Exception as e:  # W&B's service connection (ConnectionResetError, BrokenPipeError, its own errors)
            why = f"{type(e).__name__}: {first_line(e)}"
            if exit_code == 0:
                _drop_service(1)
                raise KDError(f"W&B did not take the end of run {self.run_id} ({why}): run the same command again "
                              "to finish it") from None
            _drop_service(exit_code)
            what = "marked preempting" if exit_code == 143 else "ended"
            print(f"warning: the W&B run {self.run_id} could not be {what} ({why}): its W&B service is gone; "
                  f"exiting {exit_code} all the same", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def ending(self):
        """Around everything after :meth:`start`: the W&B run ends with the process's fate (stopped: marked
        preempting, exit 143/130; failed: exit 1; else finished)."""
        try:
            yield
        except Interrupted as e:
            self.end(128 + e.signum)
            raise
        except BaseException:
            self.end(1)
            raise
        finally:
            self.end()


def _drop_service(exit_code: int) -> None:
    """This process's connection to a W&B service that is gone, torn down now (quietly): else W&B's own exit hook
    tries again at exit and prints a traceback."""
    import wandb

    with contextlib.suppress(Exception):
        wandb.teardown(exit_code)
