#!/bin/bash
# One task of slurm/agents.sbatch (srun starts one per GPU on each node):
#
#   slurm/task.sh CONTROL sweep ENTITY/PROJECT/SWEEP_ID [wandb agent options]
#   slurm/task.sh CONTROL spec SWEEP_SPEC.yaml [python -m kd.sweep options]
#
# Its GPU: where SLURM made several GPUs visible to the task (CUDA_VISIBLE_DEVICES=0,1,...: a job's --gres
# without a binding per task), the one at this task's index on the node (SLURM_LOCALID); where it made one
# visible (a binding per task), that one; where none is set, GPU SLURM_LOCALID when the job asked for GPUs
# (KD_GPUS_PER_NODE > 0), else none (a CPU cluster).
# It runs the agent or the runner from the repository's virtualenv and waits for it. When CONTROL says "stop"
# (the batch shell's stop: the time-limit warning, make slurm-requeue, make slurm-stop) it sends it one SIGTERM:
# the agent passes it on to its run (--forward-signals), the runner stops its run; either way the run
# checkpoints, marks its W&B run preempting and exits 143, then the agent or runner ends, then this task.
set -uo pipefail

control=$1
mode=$2
target=$3
shift 3
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${KD_VENV:-$root/.venv}
export PATH="$venv/bin:$PATH"
cd "$root" || exit 2

local_id=${SLURM_LOCALID:-0}
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
    export CUDA_VISIBLE_DEVICES=${gpus[$((local_id % ${#gpus[@]}))]}
elif [ "${KD_GPUS_PER_NODE:-0}" -gt 0 ]; then
    export CUDA_VISIBLE_DEVICES=$local_id
fi

case $mode in
    sweep) cmd=("$venv/bin/wandb" agent --forward-signals "$@" "$target") ;;
    spec) cmd=("$venv/bin/python" -m kd.sweep "$target" "$@") ;;
    *) echo "error: mode $mode: use sweep ENTITY/PROJECT/SWEEP_ID or spec SPEC.yaml" >&2; exit 2 ;;
esac
task="task ${SLURM_PROCID:-0} ($(hostname -s), local $local_id, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-})"
echo "$task: ${cmd[*]}"

# SLURM's own stop (scancel, requeue, preemption) signals every process itself: this shell only waits
trap : TERM
"${cmd[@]}" < /dev/null &
child=$!
stopped=
while kill -0 "$child" 2>/dev/null; do
    if [ -z "$stopped" ] && [ "$(cat "$control" 2>/dev/null)" = stop ]; then
        echo "$task: stop: SIGTERM to ${cmd[0]##*/} (pid $child)"
        kill -TERM "$child" 2>/dev/null
        stopped=1
    fi
    sleep 1
done
wait "$child"
code=$?
echo "$task: exit $code"
exit "$code"
