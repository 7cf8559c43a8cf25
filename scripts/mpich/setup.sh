#!/usr/bin/env bash
# MPICH (Debian's `mpich`: mpiexec, mpicc) for the MPI tests.
#
#   scripts/mpich/setup.sh
#
# Idempotent and quick when mpiexec and mpicc are already on PATH: it only prints what it found.
# Otherwise installs `mpich` with apt-get (root needed then). Logs go to stderr; the last line on
# stdout is `mpiexec=PATH mpicc=PATH`. Exits non-zero, saying why, when MPICH cannot be had.
set -euo pipefail

log() { echo "mpich-setup: $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

have() { command -v mpiexec >/dev/null && command -v mpicc >/dev/null; }

if ! have; then
  [ "$(id -u)" = 0 ] || die "mpiexec/mpicc missing and not root: sudo apt-get install -y mpich"
  # One install at a time (parallel test processes); dpkg's own lock would make the loser fail.
  mkdir -p /tmp/farcall-mpich
  exec 9>/tmp/farcall-mpich/setup.lock
  flock -w 600 9 || die "another setup holds /tmp/farcall-mpich/setup.lock"
  if ! have; then
    log "installing mpich with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || log "apt-get update failed; trying the install anyway"
    apt-get install -y -qq --no-install-recommends mpich libmpich-dev >&2 </dev/null ||
      die "apt-get install mpich failed"
  fi
fi
have || die "mpiexec or mpicc still not on PATH after installing mpich"
echo "mpiexec=$(command -v mpiexec) mpicc=$(command -v mpicc)"
