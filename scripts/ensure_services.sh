#!/usr/bin/env bash
# Make sure Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672) answer.
# Starts them when they are installed but stopped, installs them with apt-get
# when absent. Everything listens on loopback only.
set -euo pipefail

answers() { # host port
  timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

wait_for() { # name host port seconds
  local deadline=$((SECONDS + $4))
  until answers "$2" "$3"; do
    if ((SECONDS > deadline)); then
      echo "ensure_services: $1 did not answer on $2:$3 within $4 s" >&2
      return 1
    fi
    sleep 0.5
  done
}

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "ensure_services: $* missing and not root; install it: sudo apt-get install -y $*" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "$@" >/dev/null
}

if ! answers 127.0.0.1 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/farcall-redis.log
  wait_for Redis 127.0.0.1 6379 30
  echo "ensure_services: started Redis"
fi

if ! answers 127.0.0.1 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  rabbitmq-server -detached
  wait_for RabbitMQ 127.0.0.1 5672 90
  echo "ensure_services: started RabbitMQ"
fi
