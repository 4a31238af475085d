#!/usr/bin/env bash
# Installs RabbitMQ and Redis from Debian's packages when they are missing, and starts them bound
# to 127.0.0.1 when they are not running. Also installs Debian's headless-capable Chromium and its
# WebDriver (`chromium`, `chromium-driver`) for the dashboard's browser tests. Idempotent;
# every wait is bounded. No systemd needed.
#
#   tests/services.sh          # install if needed, start if needed
#   tests/services.sh stop     # stop both
set -euo pipefail

RABBIT_WAIT=${RABBIT_WAIT:-90}
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_NODENAME=rabbit@localhost
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1

log() { printf '[services] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -E "$@"; else
    log "need root to run: $*"; exit 1
  fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

install_missing() {
  local pkgs=()
  command -v rabbitmq-server >/dev/null || pkgs+=(rabbitmq-server)
  command -v redis-server >/dev/null || pkgs+=(redis-server)
  [ -x /usr/bin/chromium ] || pkgs+=(chromium)
  [ -x /usr/bin/chromedriver ] || pkgs+=(chromium-driver)
  if [ ${#pkgs[@]} -gt 0 ]; then
    log "installing ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    # The packages' init scripts cannot start a service without an init system; we start them below.
    as_root apt-get install -y -qq "${pkgs[@]}" >/dev/null || true
    command -v rabbitmq-server >/dev/null && command -v redis-server >/dev/null \
      && [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || {
      log "installation failed"; exit 1; }
  fi
  # The node name and address used by the server and by rabbitmqctl alike.
  as_root mkdir -p /etc/rabbitmq
  printf 'NODENAME=rabbit@localhost\nNODE_IP_ADDRESS=127.0.0.1\n' | as_root tee /etc/rabbitmq/rabbitmq-env.conf >/dev/null
}

start_redis() {
  if port_open 6379; then log "redis: running"; return; fi
  log "redis: starting"
  as_root redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' --appendonly no \
    --logfile /tmp/machinery-redis.log
  for _ in $(seq 1 100); do port_open 6379 && { log "redis: ready"; return; }; sleep 0.1; done
  log "redis did not start; see /tmp/machinery-redis.log"; exit 1
}

start_rabbitmq() {
  if port_open 5672 && timeout 20 rabbitmqctl -q await_startup >/dev/null 2>&1; then
    log "rabbitmq: running"; return
  fi
  log "rabbitmq: starting"
  # epmd bound to loopback first, or the first Erlang tool starts one on all interfaces.
  pgrep -x epmd >/dev/null || as_root epmd -address 127.0.0.1 -daemon
  if ! pgrep -f 'beam.*rabbit' >/dev/null; then
    as_root env ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_NODENAME=rabbit@localhost \
      RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}' \
      rabbitmq-server -detached
  fi
  local deadline=$((SECONDS + RABBIT_WAIT))
  until port_open 5672; do
    [ $SECONDS -lt $deadline ] || { log "rabbitmq did not open port 5672 in ${RABBIT_WAIT}s"; exit 1; }
    sleep 0.2
  done
  timeout "$RABBIT_WAIT" rabbitmqctl -q await_startup || { log "rabbitmq did not finish starting"; exit 1; }
  log "rabbitmq: ready"
}

stop_all() {
  timeout 30 rabbitmqctl -q stop >/dev/null 2>&1 || true
  redis-cli -h 127.0.0.1 shutdown nosave >/dev/null 2>&1 || true
}

case "${1:-start}" in
  start) install_missing; start_redis; start_rabbitmq ;;
  stop) stop_all ;;
  *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
