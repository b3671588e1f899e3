#!/usr/bin/env bash
# Stops the one-node Slurm that scripts/slurm_up.sh started (slurmd, slurmctld, munged, by their pid
# files); cancels its jobs first. Stopping what is not running is not an error.
set -uo pipefail
RUN=/run/slurm
command -v scancel >/dev/null && scancel --full --quiet --user "$(id -un)" 2>/dev/null
for pidfile in "$RUN/slurmd.pid" "$RUN/slurmctld.pid" /run/munge/munged.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done
echo "slurm_down: Slurm stopped" >&2
