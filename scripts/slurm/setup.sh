#!/usr/bin/env bash
# A private single-node Slurm (with its own munged) bound to loopback only, for tests.
#
#   scripts/slurm/setup.sh [STATE_DIR]      (default: $FARCALL_SLURM_DIR or /tmp/farcall-slurm)
#
# Idempotent: installs slurm-wlm and munge with apt-get when absent (root needed then), writes a
# munge key and slurm.conf into STATE_DIR, starts munged, slurmctld and slurmd, and waits until the
# node is idle. When they already run with the same config it only verifies them. Logs go to
# stderr; the last (and only) line on stdout is `export SLURM_CONF=STATE_DIR/slurm.conf`.
#
# Environment knobs: FARCALL_SLURM_CTLD_PORT (16817), FARCALL_SLURM_SLURMD_PORT (16818),
# FARCALL_SLURM_SRUN_PORTS (61000-61099), FARCALL_SLURM_PARTITION (debug),
# FARCALL_SLURM_TIMEOUT (seconds to wait for each daemon, 60).
# Stop everything with scripts/slurm/teardown.sh [STATE_DIR].
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
STATE=${1:-${FARCALL_SLURM_DIR:-/tmp/farcall-slurm}}
CTLD_PORT=${FARCALL_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${FARCALL_SLURM_SLURMD_PORT:-16818}
SRUN_PORTS=${FARCALL_SLURM_SRUN_PORTS:-61000-61099}
PARTITION=${FARCALL_SLURM_PARTITION:-debug}
TIMEOUT=${FARCALL_SLURM_TIMEOUT:-60}

log() { echo "slurm-setup: $*" >&2; }
mkdir -p "$STATE"
# One setup at a time per state dir (parallel test processes; apt-get/dpkg takes its own lock).
# Daemons are started with 9>&- so they do not inherit (and hold) the lock.
exec 9>"$STATE/setup.lock"
flock -w "$((TIMEOUT * 3))" 9 || { echo "slurm-setup: another setup holds $STATE/setup.lock" >&2; exit 1; }
die() {
  log "ERROR: $*"
  for f in "$STATE"/log/*.log; do
    [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 20 "$f" >&2; }
  done
  exit 1
}

# ---------------------------------------------------------------- install
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for pkg in slurm-wlm munge; do installed "$pkg" || missing+=("$pkg"); done
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] || die "${missing[*]} missing and not root: sudo apt-get install -y ${missing[*]}"
  log "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || log "apt-get update failed; trying the install anyway"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 </dev/null ||
    die "apt-get install ${missing[*]} failed"
fi
for bin in munged munge slurmctld slurmd sinfo scontrol; do
  command -v "$bin" >/dev/null || die "$bin not found after installing slurm-wlm and munge"
done

# ---------------------------------------------------------------- files
STATE=$(cd "$STATE" && pwd -P)
CONF="$STATE/slurm.conf"
MUNGE_DIR="$STATE/munge"
SOCKET="$MUNGE_DIR/munge.socket"
NODE=$(hostname -s)
USER_NAME=$(id -un)
mkdir -p "$STATE/log" "$STATE/ctld" "$STATE/spool" "$MUNGE_DIR"
# munged refuses group/world-writable directories on the key/socket/log paths; clients of every
# user need to reach the socket, so its directory is world-executable.
chmod 0755 "$STATE" "$MUNGE_DIR"
chmod 0700 "$STATE/log" "$STATE/ctld" "$STATE/spool"

if [ ! -s "$MUNGE_DIR/munge.key" ]; then
  log "writing a new munge key"
  (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key")
fi
chmod 0400 "$MUNGE_DIR/munge.key"

cat >"$CONF.new" <<EOF
# Written by farcall scripts/slurm/setup.sh: private single-node Slurm on loopback for tests.
ClusterName=farcall
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SrunPortRange=$SRUN_PORTS
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmUser=$USER_NAME
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=100000,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait=2
InactiveLimit=0
MessageTimeout=10
SlurmdTimeout=300
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=2 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF="$CONF"

# ---------------------------------------------------------------- helpers
pid_alive() { # pidfile name: the pid in the file is a live process called name
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  grep -q "$2" "/proc/$pid/comm" 2>/dev/null
}

wait_for() { # description seconds command...
  local what=$1 secs=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
  log "$what"
}

stop_pidfile() { # pidfile name
  local pid
  pid_alive "$1" "$2" || return 0
  pid=$(cat "$1")
  log "stopping $2 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 20))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS > deadline)); then
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  rm -f "$1"
}

munge_ok() { munge -n --socket="$SOCKET" | unmunge --socket="$SOCKET" >/dev/null; }
ctld_up() { scontrol ping | grep -q "is UP"; }
node_state() { sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n 1; }
node_idle() { [[ "$(node_state)" =~ ^(idle|mix|alloc)$ ]]; }
node_registered() { [[ "$(node_state)" =~ ^(idle|mix|alloc|drain|drng|down)$ ]]; }

# ---------------------------------------------------------------- munged
if ! pid_alive "$MUNGE_DIR/munged.pid" munged || ! munge_ok 2>/dev/null; then
  stop_pidfile "$MUNGE_DIR/munged.pid" munged
  rm -f "$SOCKET" "$SOCKET.lock"
  log "starting munged"
  munged --key-file="$MUNGE_DIR/munge.key" --socket="$SOCKET" --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$STATE/log/munged.log" --seed-file="$MUNGE_DIR/munged.seed" 9>&- ||
    die "munged did not start"
  wait_for "munged answers on $SOCKET" "$TIMEOUT" munge_ok || die "munged does not answer on $SOCKET"
fi

# ---------------------------------------------------------------- slurmctld and slurmd
changed=0
cmp -s "$CONF.new" "$CONF" || changed=1
if ((changed)); then
  if pid_alive "$STATE/slurmctld.pid" slurmctld || pid_alive "$STATE/slurmd.pid" slurmd; then
    log "slurm.conf changed: restarting slurmctld and slurmd"
  fi
  stop_pidfile "$STATE/slurmd.pid" slurmd
  stop_pidfile "$STATE/slurmctld.pid" slurmctld
  mv "$CONF.new" "$CONF"
else
  rm -f "$CONF.new"
fi

if ! pid_alive "$STATE/slurmctld.pid" slurmctld; then
  log "starting slurmctld on 127.0.0.1:$CTLD_PORT"
  slurmctld -f "$CONF" 9>&- || die "slurmctld did not start"
fi
wait_for "slurmctld is up" "$TIMEOUT" ctld_up || die "slurmctld does not answer (scontrol ping)"

if ! pid_alive "$STATE/slurmd.pid" slurmd; then
  log "starting slurmd for node $NODE on 127.0.0.1:$SLURMD_PORT"
  slurmd -f "$CONF" 9>&- || die "slurmd did not start"
fi
wait_for "node $NODE registered" "$TIMEOUT" node_registered ||
  die "node $NODE did not register (state: $(node_state))"
if ! node_idle; then
  log "node $NODE is $(node_state): resuming it"
  scontrol update NodeName="$NODE" State=RESUME >&2 || true
fi
wait_for "node $NODE is idle in partition $PARTITION" "$TIMEOUT" node_idle ||
  die "node $NODE is not idle (state: $(node_state))"

echo "export SLURM_CONF=$CONF"
