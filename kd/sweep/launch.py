"""One run of a sweep: ``python -m kd.sweep.launch PROGRAM --key=value ...``, the command of every spec.

``wandb agent`` starts a run's command with ``subprocess.Popen`` in a process group of its own and stops it
with signals to that one process: ``stop`` (a run stopped for the sweep) is SIGTERM, SIGKILL 30 s later
(``Agent._command_stop``); ``exit`` (``wandb sweep --cancel``) is SIGKILL at once; with ``--forward-signals``
every catchable signal the agent gets is sent on to it (``AgentProcess._forward_signal``), and a SIGTERM, SIGHUP
or SIGQUIT (or Ctrl-C) then makes the agent wait for its run and end. Started as ``accelerate launch``, that
process is Accelerate's launcher, which neither passes SIGTERM on to the training nor waits for it: the training
never checkpoints and keeps its GPU. This launcher instead:

* starts the program as its child in a process group of its own, with the arguments unchanged (W&B's resume
  keys among them: the programs' flag parser ignores those with a note);
* passes the first stop signal on to that whole group: SIGTERM, SIGHUP and SIGQUIT as SIGTERM (a preemption:
  the programs checkpoint, mark the W&B run preempting and exit 143), SIGINT as SIGINT (a user's stop: a
  checkpoint, exit 130); a later stop signal changes nothing (a scheduler may send one to every process, and
  the agent passes its own on again), and SIGUSR1, SIGUSR2 and SIGALRM, which the agent forwards too, are no
  stop and are ignored. It waits for the group and exits with the program's exit code (a program killed by
  signal N: 128 + N);
* forks a watcher (:func:`kd.sweep.processes.start_watch`) that outlives it: if the launcher is SIGKILLed (a
  cancel, or the agent's kill after a stop), the watcher sends the program SIGTERM (unless a stop was passed
  on already), so it checkpoints and marks its W&B run preempting itself, and SIGKILLs what is left 60 s after
  the first stop (``KD_STOP_GRACE_S`` seconds, for checkpoints that take longer), so nothing runs on with
  nobody waiting for it.

Processes: one by default ("one agent per GPU": run as many ``wandb agent`` processes as GPUs, each with its
own CUDA_VISIBLE_DEVICES, which is left as it is). ``KD_NUM_PROCESSES=N``, or an Accelerate config file (the
one ``accelerate config`` writes) whose ``num_processes`` is above 1 (named in one line when the run starts),
asks for more. One process runs the program directly (``python PROGRAM ARGS``). N processes run it under
torch's elastic launcher, ``python -m kd.sweep.elastic --standalone --nproc_per_node N PROGRAM ARGS``
(``torch.distributed.run``, what ``accelerate launch`` runs for several GPUs, exiting as its workers did; on a
machine without GPUs the processes join over gloo, so the layout is the same on a CPU): the config file's other
settings (gpu_ids among them) are not applied, so it never overrides an agent's CUDA_VISIBLE_DEVICES. The
elastic launcher passes a SIGTERM on to its workers (each checkpoints and exits 143) and is stopped with SIGTERM
by the watcher when this launcher dies; each worker is stopped with SIGTERM when the elastic launcher dies
(:func:`kd.accel.accelerator`), so a SIGKILL anywhere leaves no worker running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from kd.errors import KDError, one_line
from kd.flags import env_seconds
from kd.sweep.processes import TERM_GRACE_S, signal_group, start_watch, tell, wait_group

FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT, signal.SIGHUP: signal.SIGTERM,
             signal.SIGQUIT: signal.SIGTERM}
IGNORED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)  # forwarded by the agent; their default would end it
GROUP_GRACE_S = 30.0  # after the program exits, how long its group's other processes get to end
USAGE = "usage: python -m kd.sweep.launch PROGRAM [--key=value ...] (the command of a sweep spec)"


def accelerate_config() -> Path | None:
    """Accelerate's default config file, found the way ``accelerate launch`` finds it (without importing it)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    path = Path(os.path.expanduser(home)) / "accelerate" / "default_config.yaml"
    return path if path.is_file() else None


def num_processes(config: Path | None) -> int:
    """KD_NUM_PROCESSES, else the config file's num_processes, else 1."""
    raw = os.environ.get("KD_NUM_PROCESSES", "").strip()
    if raw:
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 1024:
            raise KDError(f"KD_NUM_PROCESSES={raw!r} must be a whole number >= 1 and <= 1024 (processes per run; "
                          "one GPU each): unset it for one process")
        return int(raw)
    if config is None:
        return 1
    import yaml

    try:
        value = (yaml.safe_load(config.read_text()) or {}).get("num_processes", 1)
    except (yaml.YAMLError, AttributeError, OSError) as e:
        raise KDError(f"cannot read the Accelerate config {config} ({type(e).__name__}): fix it with "
                      "`accelerate config`, or set KD_NUM_PROCESSES") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return 1  # -1 and the like: Accelerate's "ask"; one process here
    if value > MAX_PROCESSES:
        raise KDError(f"the Accelerate config {config} asks for num_processes: {value}, over {MAX_PROCESSES}: fix it "
                      "with `accelerate config`, or set KD_NUM_PROCESSES")
    return value


def stop_grace() -> float:
    """KD_STOP_GRACE_S: how long a stopped run gets to checkpoint before its watcher SIGKILLs it."""
    return env_seconds("KD_STOP_GRACE_S", TERM_GRACE_S, 1, 86400, "how long a stopped run gets to checkpoint")


MAX_PROCESSES = 1024
ELASTIC = ["-m", "kd.sweep.elastic"]  # torch's elastic launcher, exiting as its workers did (kd.sweep.elastic)


def check_processes(n: int, why: str) -> None:
    """N processes need N GPUs where there are GPUs (more would share one), and at most one per CPU core where
    there are none (they join over gloo)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and n > gpus:
        raise KDError(f"{why} asks for {n} processes per run but {gpus} GPU(s) are visible (CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): one process per GPU, so at most {gpus}")
    cores = os.cpu_count() or 1
    if not gpus and n > cores:
        raise KDError(f"{why} asks for {n} processes per run on a machine without GPUs and {cores} CPU cores: at "
                      f"most {cores} (or KD_NUM_PROCESSES=1)")


def check_flags(program: str, args: list[str], n: int = 1) -> None:
    """The program's flags, parsed once here as the program would parse them: a bad flag is one line before any
    worker starts, instead of one line per worker and a launcher's failure report. ``n`` processes split each
    step's batch (--batch_size, all processes together) into equal parts, so n must divide it."""
    from kd.flags import parse_flags
    from kd.sweep.spec import ENTRY_POINTS

    classes = {p.name: cls for p, cls in ENTRY_POINTS.items()}
    cls = classes.get(Path(program).name)
    if cls is not None and not {"-h", "--help"} & set(args):
        cfg = parse_flags(cls, args, notes=False)
        batch = getattr(cfg, "batch_size", None)
        if batch is not None and batch % n:
            raise KDError(f"--batch_size={batch} is the batch of all {n} processes together, and {n} does not divide "
                          f"it: pass a multiple of {n} (e.g. {batch - batch % n or n}), or KD_NUM_PROCESSES to a "
                          "divisor of it")


def child_argv(program: str, args: list[str]) -> list[str]:
    config = accelerate_config()
    n = num_processes(config)
    if n == 1:
        return [sys.executable, program, *args]
    why = "KD_NUM_PROCESSES" if os.environ.get("KD_NUM_PROCESSES", "").strip() else f"the Accelerate config {config}"
    check_processes(n, why)
    check_flags(program, args, n)
    print(f"kd.sweep.launch: {n} processes ({why}; KD_NUM_PROCESSES=1 for one), under torch's elastic launcher",
          file=sys.stderr, flush=True)
    return [sys.executable, *ELASTIC, "--standalone", "--nproc_per_node", str(n), program, *args]


def _tell_watcher(fd: int):
    """preexec_fn: the program, started but not yet running, names its process group to the watcher."""

    def preexec():
        tell(fd, f"group {os.getpid()}")

    return preexec


def _ignore(signum, frame) -> None:
    pass


class Launch:
    """The program as a child in its own process group, with the stop signals passed on to that group."""

    def __init__(self, cmd: list[str], grace: float = TERM_GRACE_S):
        self.cmd, self.grace = cmd, grace
        self.child: subprocess.Popen | None = None
        self.got: list[int] = []
        self.watcher: int | None = None

    def forward(self, signum, frame) -> None:
        self.got.append(signum)
        if self.child is None:
            return
        name = signal.Signals(signum).name
        if len(self.got) > 1:
            print(f"kd.sweep.launch: {name}: the run is stopping already ({signal.Signals(self.got[0]).name})",
                  file=sys.stderr, flush=True)
            return
        sent = FORWARDED[signum]
        tell(self.watcher, "stop")
        print(f"kd.sweep.launch: {name}: passing {signal.Signals(sent).name} to the run's process group "
              f"{self.child.pid} (it checkpoints, then exits)", file=sys.stderr, flush=True)
        signal_group(self.child.pid, sent)

    def run(self) -> int:
        """Start the watcher and the program, pass the first stop signal on to its group, wait; the exit code."""
        previous = {s: signal.signal(s, self.forward) for s in FORWARDED}
        previous.update({s: signal.signal(s, _ignore) for s in IGNORED})
        try:
            if self.got:  # stopped before anything started
                return 128 + FORWARDED[self.got[0]]
            self.watcher = start_watch(self.grace)
            self.child = subprocess.Popen(self.cmd, process_group=0, preexec_fn=_tell_watcher(self.watcher))
            if self.got:  # a signal came while it was starting
                first = self.got[0]
                self.got.clear()
                self.forward(first, None)
            code = self.child.wait()
            if wait_group(self.child.pid, GROUP_GRACE_S):
                tell(self.watcher, "done")  # else the watcher stops what is left of the group
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.watcher is not None:
                os.close(self.watcher)
        code = 128 - code if code < 0 else code
        return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    try:
        if not argv or argv[0].startswith("-"):
            raise KDError(f"the first argument must be the program, got {argv[0] if argv else 'none'}: {USAGE}")
        return Launch(child_argv(argv[0], argv[1:]), stop_grace()).run()
    except KDError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
