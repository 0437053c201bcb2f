#!/bin/bash
# A one-node SLURM cluster on this machine, all of it in one folder, for the SLURM tests (make test-slurm):
#
#   slurm/local-cluster.sh start DIR    configure DIR (slurm.conf, a munge key, state and spool folders, logs),
#                                       start munged, slurmctld and slurmd, wait until the node takes jobs
#   slurm/local-cluster.sh stop DIR     cancel its jobs, stop the daemons and whatever they left running
#
# Commands then talk to it with SLURM_CONF=DIR/slurm.conf (sbatch, squeue, scontrol, scancel). The node is this
# machine with its real CPU count; its daemons listen on free ports of 127.0.0.1; no cgroups
# (ProctrackType=proctrack/linuxproc: the processes of a job are the descendants of its tasks); runs as root
# (slurmd starts jobs as their user). Needs Debian's slurm-wlm and munge (make test-slurm installs them).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")
conf=$dir/slurm.conf
export SLURM_CONF=$conf

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

configure() {
    mkdir -p "$dir"/{state,spool,munge,log}
    chmod 700 "$dir" "$dir/munge"
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    local node cpus
    node=$(hostname -s)
    cpus=$(nproc --all)
    cat > "$conf" <<EOF
# written by slurm/local-cluster.sh: a one-node test cluster in $dir
ClusterName=kdtest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_of() { [ -s "$1" ] && cat "$1"; }

start() {
    for exe in munged slurmctld slurmd sbatch scontrol; do
        command -v "$exe" >/dev/null || { echo "error: $exe is not on PATH: apt-get install slurm-wlm munge" >&2; exit 2; }
    done
    configure
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    slurmctld -f "$conf"
    slurmd -f "$conf" -N "$(hostname -s)"
    local i
    for i in $(seq 120); do
        if scontrol show node "$(hostname -s)" 2>/dev/null | grep -qE "State=IDLE"; then
            echo "SLURM test cluster up in $dir (SLURM_CONF=$conf)"
            return 0
        fi
        sleep 0.5
    done
    echo "error: the test cluster in $dir did not come up in 60 s; its logs:" >&2
    tail -n 20 "$dir"/log/*.log >&2
    exit 1
}

# the processes this cluster's daemons started (they carry its SLURM_CONF), other than this script's own
leftovers() {
    local p
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = $$ ] && continue
        { tr '\0' '\n' < "/proc/$p/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$conf" && echo "$p"
    done
    return 0
}

stop() {
    [ -f "$conf" ] || { echo "no test cluster in $dir" >&2; return 0; }
    scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    local i
    for i in $(seq 90); do  # jobs end within KillWait (30 s) of their cancel
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.5
    done
    local pid
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        pid=$(pid_of "$pidfile") || continue
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in $(leftovers); do kill -KILL "$pid" 2>/dev/null || true; done
    echo "SLURM test cluster in $dir stopped"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
