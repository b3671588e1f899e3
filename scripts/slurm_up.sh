#!/usr/bin/env bash
# Starts a one-node Slurm on this machine (controller and compute node both here), for the tests
# of `executor: slurm` (tests/test_slurm.py) and CI: Debian's slurm-wlm and munge, a munge key, a
# slurm.conf for $(hostname) with all its CPUs, then munged, slurmctld and slurmd; returns once
# sinfo shows the node idle. Idempotent (a running Slurm with the same config is left as it is) and
# safe to run from several processes at once (flock). Needs root and apt. `scripts/slurm_down.sh` stops it.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
RUN=/run/slurm
WAIT_S=${SLURM_UP_WAIT_S:-60}

die() { echo "slurm_up: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (it installs packages and starts daemons); run it with sudo"
mkdir -p /run/lock
exec 9>/run/lock/pretextlab-slurm-up.lock
flock 9  # a second caller waits here, then finds Slurm up (the daemons are started without fd 9)

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get to install them"
    echo "slurm_up: installing slurm-wlm and munge (apt)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null && apt-get install -y -qq slurm-wlm munge >/dev/null; } \
        || die "apt-get install slurm-wlm munge failed"
fi

host=$(hostname -s)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc alone obeys OMP_NUM_THREADS (the test command sets 1)
# RealMemory a little under the machine's, so an sbatch --mem (submitit's mem_gb) that fits is accepted.
memory_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS" "$RUN"
new_conf=$(cat <<CONF
# Written by pretextlab's scripts/slurm_up.sh: a one-node cluster on $host.
ClusterName=pretextlab
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No cgroups here (containers, CI): processes tracked through /proc, tasks not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
# A requeued job (preemption, scontrol requeue, submitit's own requeue) may run again; a signalled
# job gets 5 s between SIGTERM and SIGKILL to checkpoint (ample for the tests' tiny runs).
JobRequeue=1
KillWait=5
MinJobAge=300
SlurmdTimeout=60
InactiveLimit=0
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

changed=1
if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new_conf" ]; then changed=0; fi
if [ "$changed" = 1 ]; then
    printf '%s\n' "$new_conf" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    # A daemon running with another config is restarted (by its pid file) below.
    for pidfile in "$RUN/slurmd.pid" "$RUN/slurmctld.pid"; do
        if pid_alive "$pidfile"; then kill "$(cat "$pidfile")"; sleep 1; fi
    done
fi

# munge: a key (the package may ship one), its directories, the daemon as the munge user.
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge
if ! pid_alive /run/munge/munged.pid; then
    rm -f /run/munge/munge.socket.2 /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged 9>&- || die "munged did not start (see /var/log/munge/munged.log)"
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munge does not work (see /var/log/munge/munged.log)"

if ! pid_alive "$RUN/slurmctld.pid"; then
    /usr/sbin/slurmctld 9>&- || die "slurmctld did not start (see $LOGS/slurmctld.log)"
fi
if ! pid_alive "$RUN/slurmd.pid"; then
    /usr/sbin/slurmd 9>&- || die "slurmd did not start (see $LOGS/slurmd.log)"
fi

deadline=$((SECONDS + WAIT_S))
while :; do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null | head -n1 || true)
    case "$state" in
        idle|mix|alloc) break ;;
        down*|drain*|fail*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || die "node $host is not idle after ${WAIT_S} s (sinfo says '${state:-nothing}'); see $LOGS/slurmctld.log and $LOGS/slurmd.log"
    sleep 0.5
done
echo "slurm_up: Slurm is up on $host ($cpus CPUs, ${memory_mb} MB): node $state" >&2
