#!/usr/bin/env bash
# lsgm CI: start a single-node Slurm "cluster" on this machine, as root, without systemd, for the
# real-Slurm tests (tests/test_workflow.py -m slow, profile .ci/slurm-profile). Debian 12 (bookworm):
# slurm-wlm 22.05.8, munge 0.5.15. Idempotent: re-running while it is up only re-checks health; a
# stale/broken state is stopped and restarted.
#
#   .ci/slurm/start_local_slurm.sh          # install (apt) if needed, configure, start, self-test
#   export SLURM_CONF=$SLURM_BASE/etc/slurm.conf   (printed at the end; every Slurm client needs it)
#   .ci/slurm/stop_local_slurm.sh [--purge] # stop all daemons (by pidfile); --purge also deletes state
# CI usage:  .ci/slurm/start_local_slurm.sh; trap .ci/slurm/stop_local_slurm.sh EXIT; ...tests...
#
# Env knobs:
#   SLURM_BASE      state/config/log dir            (default /tmp/lsgm-slurm)
#   SLURM_ACCOUNTING none|slurmdbd                  (default none: sacct unusable -> snakemake needs
#                    slurm-status-command: squeue; slurmdbd = local MariaDB + slurmdbd, +~14 s apt, +~7 s start)
#   SLURM_NODE_CPUS  CPUs advertised                (default: nproc)
#   SLURM_NODE_MEM   RealMemory in MB               (default: 80% of MemTotal)
#   SLURM_SKIP_APT=1 do not apt-get install
#   SLURM_FAKE_GPUS=N  advertise N fake GPUs (gres.conf File= symlinks to /dev/null) so gpu=/gres=
#                    requests schedule on a CPU-only box (default 0: GPU requests rejected at sbatch)
#   SLURM_FAKE_GPU_TYPE  GPU type name for them (default a100; rules asking another gpu_model fail)
#   SLURM_LINK_ETC=0 do not symlink /etc/slurm/slurm.conf -> \$SLURM_CONF (breaks snakemake jobs, see below)
set -euo pipefail

SLURM_BASE=${SLURM_BASE:-/tmp/lsgm-slurm}
SLURM_ACCOUNTING=${SLURM_ACCOUNTING:-none}
NODE_CPUS=${SLURM_NODE_CPUS:-$(nproc)}
NODE_MEM=${SLURM_NODE_MEM:-$(awk '/MemTotal/{printf "%d", $2/1024*0.8}' /proc/meminfo)}
CTL_HOST=$(hostname -s)
FAKE_GPUS=${SLURM_FAKE_GPUS:-0}; FAKE_GPU_TYPE=${SLURM_FAKE_GPU_TYPE:-a100}
WANT="acct=$SLURM_ACCOUNTING cpus=$NODE_CPUS mem=$NODE_MEM gpus=$FAKE_GPUS:$FAKE_GPU_TYPE"
export SLURM_CONF="$SLURM_BASE/etc/slurm.conf"
MUNGE_DIR="$SLURM_BASE/munge"
MUNGE_SOCK="$MUNGE_DIR/munge.socket.2"

log() { echo "[start_local_slurm] $*" >&2; }

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---------------------------------------------------------------- 1. packages
if [[ "${SLURM_SKIP_APT:-0}" != 1 ]] && { ! command -v slurmctld || ! command -v slurmd || ! command -v munged; } >/dev/null; then
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
if [[ "${SLURM_SKIP_APT:-0}" != 1 && "$SLURM_ACCOUNTING" == slurmdbd ]] && { ! command -v slurmdbd || ! command -v mariadbd; } >/dev/null; then
  log "installing slurmdbd mariadb-server"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmdbd mariadb-server >/dev/null
fi

# ---------------------------------------------------------------- 2. already up?
if alive "$SLURM_BASE/run/slurmctld.pid" && alive "$SLURM_BASE/run/slurmd.pid" && alive "$MUNGE_DIR/munged.pid" \
   && [[ "$(cat "$SLURM_BASE/run/settings" 2>/dev/null)" == "$WANT" ]] \
   && { [[ "$SLURM_ACCOUNTING" != slurmdbd ]] || alive "$SLURM_BASE/run/slurmdbd.pid"; } \
   && timeout 10 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  log "already running"; echo "export SLURM_CONF=$SLURM_CONF"; exit 0
fi
# partial / stale state -> clean stop first
"$(dirname "$(readlink -f "$0")")/stop_local_slurm.sh" >/dev/null 2>&1 || true

mkdir -p "$SLURM_BASE"/{etc,state,spool,log,run} "$MUNGE_DIR"
chmod 755 "$SLURM_BASE" "$SLURM_BASE"/*
chmod 700 "$MUNGE_DIR"

# Another cluster on this machine (e.g. one started with a different SLURM_BASE) holds the ports: say so, do not
# start a controller that dies with "Address already in use".
for port in 6817 6818; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    log "port $port is already in use (another Slurm started with a different SLURM_BASE?); stop it first with"
    log "  SLURM_BASE=<its base> $(dirname "$(readlink -f "$0")")/stop_local_slurm.sh"
    exit 1
  fi
done
# from here on a failed start stops what it started, so no half-started daemon keeps the ports
trap 'rc=$?; if (( rc != 0 )); then log "start failed (exit $rc): stopping the daemons it started";
      "$(dirname "$(readlink -f "$0")")/stop_local_slurm.sh" >/dev/null 2>&1 || true; fi' EXIT
# ---------------------------------------------------------------- 3. munge (own key + socket)
if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
  dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1 count=1024 status=none
fi
chmod 400 "$MUNGE_DIR/munge.key"
munged --force --socket="$MUNGE_SOCK" --key-file="$MUNGE_DIR/munge.key" \
       --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
       --seed-file="$MUNGE_DIR/munged.seed"
for _ in $(seq 50); do [[ -S "$MUNGE_SOCK" ]] && break; sleep 0.1; done
munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK" >/dev/null
log "munged up (pid $(cat "$MUNGE_DIR/munged.pid"))"

# ---------------------------------------------------------------- 4. accounting (optional slurmdbd)
ACCT_LINES="AccountingStorageType=accounting_storage/none"
if [[ "$SLURM_ACCOUNTING" == slurmdbd ]]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStoragePass=$MUNGE_SOCK
AccountingStorageTRES=gres/gpu"   # Pass= is the munge socket for talking to slurmdbd (AuthInfo is not used there)
fi

start_slurmdbd() {  # local MariaDB on 127.0.0.1:3307 (own datadir) + slurmdbd on :6819
  local my="$SLURM_BASE/mysql"
  mkdir -p "$my"
  if [[ ! -d "$my/data/mysql" ]]; then
    mariadb-install-db --no-defaults --user=root --datadir="$my/data" \
      --auth-root-authentication-method=socket >"$my/install.log" 2>&1
  fi
  mariadbd --no-defaults --user=root --datadir="$my/data" --socket="$my/mysql.sock" \
    --pid-file="$my/mariadbd.pid" --bind-address=127.0.0.1 --port=3307 \
    --log-error="$my/error.log" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 --skip-name-resolve &
  for _ in $(seq 100); do [[ -S "$my/mysql.sock" ]] && break; sleep 0.2; done
  mariadb --no-defaults -S "$my/mysql.sock" -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
  cat > "$SLURM_BASE/etc/slurmdbd.conf" <<DBD
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$SLURM_BASE/run/slurmdbd.pid
LogFile=$SLURM_BASE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3307
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
DBD
  chmod 600 "$SLURM_BASE/etc/slurmdbd.conf"
  slurmdbd   # reads \$(dirname \$SLURM_CONF)/slurmdbd.conf
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.2; done
  sacctmgr -i add cluster localci >/dev/null 2>&1 || true
  log "slurmdbd up (pid $(cat "$SLURM_BASE/run/slurmdbd.pid"))"
}

# ---------------------------------------------------------------- 5. slurm.conf
GRES_TYPES=""; NODE_GRES=""; rm -f "$SLURM_BASE/etc/gres.conf"
if (( FAKE_GPUS > 0 )); then
  GRES_TYPES="GresTypes=gpu"; NODE_GRES="Gres=gpu:$FAKE_GPU_TYPE:$FAKE_GPUS"
  # slurmd counts gpu GRES only from File= character devices (Count= alone registers 0 ->
  # node INVAL "gres/gpu count reported lower than configured"); symlinks to /dev/null pass.
  mkdir -p "$SLURM_BASE/fakedev"; rm -f "$SLURM_BASE"/fakedev/gpu*
  for ((i = 0; i < FAKE_GPUS; i++)); do ln -s /dev/null "$SLURM_BASE/fakedev/gpu$i"; done
  echo "NodeName=localhost Name=gpu Type=$FAKE_GPU_TYPE File=$SLURM_BASE/fakedev/gpu[0-$((FAKE_GPUS - 1))]" > "$SLURM_BASE/etc/gres.conf"
fi
cat > "$SLURM_CONF" <<EOF
ClusterName=localci
SlurmctldHost=$CTL_HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SLURM_BASE/state
SlurmdSpoolDir=$SLURM_BASE/spool
SlurmctldPidFile=$SLURM_BASE/run/slurmctld.pid
SlurmdPidFile=$SLURM_BASE/run/slurmd.pid
SlurmctldLogFile=$SLURM_BASE/log/slurmctld.log
SlurmdLogFile=$SLURM_BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd, no cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
LaunchParameters=use_interactive_step
# scheduling
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
DefMemPerCPU=1024          # else a job without --mem takes ALL node memory -> jobs serialize
MailProg=/bin/true
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
# accounting
$ACCT_LINES
JobCompType=jobcomp/filetxt
JobCompLoc=$SLURM_BASE/log/jobcomp.txt
# the node and one partition (GRES only if SLURM_FAKE_GPUS>0)
$GRES_TYPES
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEM $NODE_GRES State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
# slurmd also wants cgroup.conf absent or valid; keep it absent.
# Link it to the default path: snakemake-executor-plugin-slurm-jobstep strips ALL SLURM_*
# env vars (SLURM_CONF included) before its nested `srun`, so inside a job only
# /etc/slurm/slurm.conf is found ("srun: fatal: Could not establish a configuration source").
if [[ "${SLURM_LINK_ETC:-1}" == 1 ]]; then
  if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then
    mkdir -p /etc/slurm && ln -sfn "$SLURM_CONF" /etc/slurm/slurm.conf
  else
    log "WARNING: /etc/slurm/slurm.conf is a real file; not replacing it (jobs' nested srun will read it)"
  fi
fi

# ---------------------------------------------------------------- 6. daemons
[[ "$SLURM_ACCOUNTING" == slurmdbd ]] && start_slurmdbd
slurmctld -f "$SLURM_CONF" -i           # -i: ignore (stale) saved state -> clean restarts
slurmd -f "$SLURM_CONF" -N localhost
for i in $(seq 120); do                 # up to 60 s: a loaded 2-core machine registers the node slowly
  alive "$SLURM_BASE/run/slurmctld.pid" || { log "slurmctld died"; tail -n 5 "$SLURM_BASE/log/slurmctld.log"; exit 1; }
  st=$(timeout 5 sinfo -h -n localhost -o %T 2>/dev/null || true)
  [[ "$st" == idle* ]] && break
  [[ "$st" == down* || "$st" == drain* ]] && scontrol update nodename=localhost state=resume 2>/dev/null || true
  sleep 0.5
done
sinfo
[[ "$(sinfo -h -n localhost -o %T)" == idle* ]] || { log "node not idle"; tail -n 20 "$SLURM_BASE"/log/slurm*.log; exit 1; }

# ---------------------------------------------------------------- 7. smoke test
timeout 120 srun -N1 -n1 -t 1 hostname >/dev/null
echo "$WANT" > "$SLURM_BASE/run/settings"
log "srun OK; cluster ready ($WANT)"
echo "export SLURM_CONF=$SLURM_CONF"
