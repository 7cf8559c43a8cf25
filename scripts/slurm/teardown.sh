#!/usr/bin/env bash
# Stop the private Slurm started by scripts/slurm/setup.sh [STATE_DIR]:
# cancel its jobs, then stop slurmd, slurmctld and munged (only the pids in STATE_DIR's pid files).
#
#   scripts/slurm/teardown.sh [STATE_DIR] [--purge]     (--purge also removes STATE_DIR)
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
purge=0
args=()
for a in "$@"; do
  case "$a" in
  --purge) purge=1 ;;
  *) args+=("$a") ;;
  esac
done
STATE=${args[0]:-${FARCALL_SLURM_DIR:-/tmp/farcall-slurm}}
log() { echo "slurm-teardown: $*" >&2; }

if [ ! -d "$STATE" ]; then
  log "nothing to do: $STATE does not exist"
  exit 0
fi
STATE=$(cd "$STATE" && pwd -P)
export SLURM_CONF="$STATE/slurm.conf"

pid_alive() { # pidfile name
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  grep -q "$2" "/proc/$pid/comm" 2>/dev/null
}

stop_pidfile() { # pidfile name
  local pid
  if ! pid_alive "$1" "$2"; then
    rm -f "$1"
    return 0
  fi
  pid=$(cat "$1")
  log "stopping $2 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 20))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS > deadline)); then
      log "$2 (pid $pid) ignored SIGTERM for 20 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  rm -f "$1"
}

# Cancel jobs while slurmctld and slurmd still run, so their job steps are killed too.
if [ -f "$SLURM_CONF" ] && pid_alive "$STATE/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    deadline=$((SECONDS + 15))
    while [ -n "$(squeue -h -o %i 2>/dev/null || true)" ] && ((SECONDS < deadline)); do
      sleep 0.2
    done
  fi
fi

stop_pidfile "$STATE/slurmd.pid" slurmd
stop_pidfile "$STATE/slurmctld.pid" slurmctld
stop_pidfile "$STATE/munge/munged.pid" munged

if ((purge)); then
  log "removing $STATE"
  rm -rf "$STATE"
fi
log "stopped"
