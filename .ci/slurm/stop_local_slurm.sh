#!/usr/bin/env bash
# lsgm CI: stop the single-node Slurm started by .ci/slurm/start_local_slurm.sh. Kills only the daemons
# recorded in its own pidfiles (never by name). Safe to run repeatedly.
#   ./stop_local_slurm.sh          # stop daemons, keep $SLURM_BASE (config/logs)
#   ./stop_local_slurm.sh --purge  # also delete $SLURM_BASE
set -uo pipefail
SLURM_BASE=${SLURM_BASE:-/tmp/lsgm-slurm}
export SLURM_CONF="$SLURM_BASE/etc/slurm.conf"

stop_pidfile() {  # name pidfile
  local name=$1 pf=$2 pid
  [[ -f "$pf" ]] || return 0
  pid=$(cat "$pf" 2>/dev/null) || return 0
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "[stop_local_slurm] stopped $name ($pid)"
  fi
  rm -f "$pf"
}

# cancel leftover jobs first so slurmstepd children exit
[[ -f "$SLURM_CONF" ]] && timeout 10 scancel --user=root 2>/dev/null || true
stop_pidfile slurmd    "$SLURM_BASE/run/slurmd.pid"
stop_pidfile slurmctld "$SLURM_BASE/run/slurmctld.pid"
stop_pidfile slurmdbd  "$SLURM_BASE/run/slurmdbd.pid"
stop_pidfile mariadbd  "$SLURM_BASE/mysql/mariadbd.pid"
stop_pidfile munged    "$SLURM_BASE/munge/munged.pid"
if [[ "${1:-}" == --purge ]]; then
  [[ -L /etc/slurm/slurm.conf && "$(readlink /etc/slurm/slurm.conf)" == "$SLURM_CONF" ]] && rm -f /etc/slurm/slurm.conf
  rm -rf "$SLURM_BASE"
fi
exit 0
