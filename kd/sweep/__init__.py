"""Run a W&B sweep spec offline: the stand-in for ``wandb sweep`` + ``wandb agent`` where no server is.

    python -m kd.sweep sweeps/demo/teachers.yaml               # run every run of the grid, here
    python -m kd.sweep sweeps/demo/teachers.yaml --dry_run     # print each run's command, run nothing
    python -m kd.sweep SPEC.yaml --count 2 --keep_going --state_dir DIR
    python -m kd.sweep.launch train.py --seed=0 ...            # one run, as a spec's command starts it

The spec is the YAML that ``wandb sweep`` takes, unchanged (:mod:`kd.sweep.spec` checks it, bounded
parsing in :mod:`kd.sweep.specfile`). ``create_sweep_command`` / ``create_sweep_command_args`` from
``wandb.sdk.launch.sweeps.utils`` format each command exactly as ``wandb agent`` does (``--key=value``,
booleans as ``True``/``False``, the same ``${...}`` macros). Each run is a child process started in the
repository root (the folder that holds the spec's ``program``) with the virtualenv's ``bin`` first on PATH.
The specs' command, ``[${env}, ${interpreter}, -m, kd.sweep.launch, ${program}, ${args}]``, starts the
program through :mod:`kd.sweep.launch`, which passes the stop signals of either agent on to the training.

Exported to each run, as the agent does: ``WANDB_RUN_ID`` (fresh per run, the same again when a cut-off run
is rerun, so the W&B run continues), ``WANDB_SWEEP_PARAM_PATH`` (the run's parameters, the agent's YAML),
``WANDB_DIR`` (the root, if unset), ``WANDB_PROJECT``/``WANDB_ENTITY`` (if the spec names them). Not
exported: ``WANDB_SWEEP_ID``. With it set, ``wandb.init`` ignores the project and run id the program asks for,
and ``wandb sync`` of the offline run fails on the server ("sweep ... not found"), since no server knows a
local sweep. The local sweep id is exported as ``KD_SWEEP_ID`` instead.

State (:mod:`kd.sweep.state`): ``runs/sweeps/<spec-stem>-<sha8>/state.json`` (``--state_dir`` to override),
under an fcntl lock, so several runners can share one spec: a run is claimed (status running, pid, host,
start time) before it starts and marked finished or failed after. Started again, a runner skips finished
runs, retries failed ones and reruns runs whose runner died (the programs resume from their own
checkpoints). A run that exits 143 (preempted: it checkpointed on SIGTERM) is rerun at once under the same
run id, as W&B's agent reruns a preempting run (:mod:`kd.sweep.runner`). Each run's output goes to
``<run-key>.log`` beside the state.
"""


def __getattr__(name: str):
    if name == "main":  # kd.sweep.main, without importing the runner for `python -m kd.sweep.launch`
        from kd.sweep.cli import main

        return main
    raise AttributeError(f"module 'kd.sweep' has no attribute {name!r}")
