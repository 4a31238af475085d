#!/usr/bin/env bash
# A Redis Sentinel deployment on loopback for tests/tests/sentinel.rs: one master, one replica
# and three sentinels, on ports that do not clash with the shared Redis on 6379.
#
#   tests/sentinel.sh start      # start what is not running, wait until a failover is possible
#   tests/sentinel.sh stop       # stop all five
#   tests/sentinel.sh failover   # SENTINEL FAILOVER, wait until the sentinels name the new master
#   tests/sentinel.sh kill       # kill -9 the master, wait until the sentinels promote the replica
#   tests/sentinel.sh master     # print the master's port, as the sentinels name it
#
# Redis nodes 6390 and 6391 (either may be the master: failovers swap them), password
# `redis-secret`; sentinels 26390-26392, password `sentinel-secret`, master name
# `machinery-sentinel`. No data is saved; DEBUG is allowed from loopback (a test stalls the
# replica with DEBUG SLEEP). Every wait is bounded. Idempotent.
set -euo pipefail

MASTER_NAME=machinery-sentinel
REDIS_PASS=redis-secret
SENTINEL_PASS=sentinel-secret
NODES=(6390 6391)
SENTINELS=(26390 26391 26392)
DIR=${SENTINEL_DIR:-/tmp/machinery-sentinel}

log() { printf '[sentinel] %s\n' "$*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
node_cli() { redis-cli --no-auth-warning -p "$1" -a "$REDIS_PASS" "${@:2}"; }
sentinel_cli() { redis-cli --no-auth-warning -p "$1" -a "$SENTINEL_PASS" "${@:2}"; }

# redis-sentinel ships with Debian's redis-sentinel package; redis-server --sentinel is the same
# program, so the redis-server package alone is enough.
sentinel_bin() {
  if command -v redis-sentinel >/dev/null; then echo redis-sentinel; else echo "redis-server"; fi
}

need_redis() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return
  log "redis-server is missing: run tests/services.sh first (it installs it)"; exit 1
}

# The master's port as the first sentinel that answers names it; empty when none answers.
master_port() {
  local s reply
  for s in "${SENTINELS[@]}"; do
    reply=$(sentinel_cli "$s" SENTINEL get-master-addr-by-name "$MASTER_NAME" 2>/dev/null) || continue
    reply=$(printf '%s\n' "$reply" | sed -n 2p)
    [ -n "$reply" ] && { echo "$reply"; return; }
  done
}

start_node() {
  local port=$1 master=$2
  port_open "$port" && return
  mkdir -p "$DIR"
  local args=(--port "$port" --bind 127.0.0.1 --daemonize yes --save '' --appendonly no
    --dir "$DIR" --pidfile "$DIR/redis-$port.pid" --logfile "$DIR/redis-$port.log"
    --requirepass "$REDIS_PASS" --masterauth "$REDIS_PASS"
    --repl-diskless-sync yes --repl-diskless-sync-delay 0 --enable-debug-command local)
  if [ -n "$master" ] && [ "$master" != "$port" ]; then
    args+=(--replicaof 127.0.0.1 "$master")
  fi
  log "redis $port: starting${master:+ (master $master)}"
  redis-server "${args[@]}"
  for _ in $(seq 1 100); do port_open "$port" && return; sleep 0.05; done
  log "redis $port did not start; see $DIR/redis-$port.log"; exit 1
}

start_sentinel() {
  local port=$1 master=$2
  port_open "$port" && return
  mkdir -p "$DIR"
  # Sentinel rewrites its file (epochs, known replicas and sentinels): a fresh one each start.
  cat >"$DIR/sentinel-$port.conf" <<EOF
port $port
bind 127.0.0.1
daemonize yes
dir $DIR
pidfile $DIR/sentinel-$port.pid
logfile $DIR/sentinel-$port.log
requirepass $SENTINEL_PASS
sentinel monitor $MASTER_NAME 127.0.0.1 $master 2
sentinel auth-pass $MASTER_NAME $REDIS_PASS
sentinel sentinel-pass $SENTINEL_PASS
sentinel down-after-milliseconds $MASTER_NAME 1000
sentinel failover-timeout $MASTER_NAME 4000
sentinel parallel-syncs $MASTER_NAME 1
EOF
  log "sentinel $port: starting"
  if [ "$(sentinel_bin)" = redis-sentinel ]; then
    redis-sentinel "$DIR/sentinel-$port.conf"
  else
    redis-server "$DIR/sentinel-$port.conf" --sentinel
  fi
  for _ in $(seq 1 100); do port_open "$port" && return; sleep 0.05; done
  log "sentinel $port did not start; see $DIR/sentinel-$port.log"; exit 1
}

# Ready for a failover: every sentinel names the same master, which has its replica online,
# and the sentinels know the replica and each other.
wait_ready() {
  local master=$1 s
  for _ in $(seq 1 300); do
    local ok=1
    node_cli "$master" ROLE 2>/dev/null | grep -qx master || ok=0
    [ "$(node_cli "$master" INFO replication 2>/dev/null | tr -d '\r' | grep -c 'state=online')" -ge 1 ] || ok=0
    for s in "${SENTINELS[@]}"; do
      [ "$(sentinel_cli "$s" SENTINEL get-master-addr-by-name "$MASTER_NAME" 2>/dev/null | sed -n 2p)" = "$master" ] || ok=0
      sentinel_cli "$s" SENTINEL replicas "$MASTER_NAME" 2>/dev/null | grep -q '^slave$' || ok=0
      [ "$(sentinel_cli "$s" SENTINEL master "$MASTER_NAME" 2>/dev/null | sed -n '/^num-other-sentinels$/{n;p}')" = 2 ] || ok=0
    done
    [ $ok = 1 ] && { log "ready: master $master"; return; }
    sleep 0.1
  done
  log "not ready after 30 s; logs in $DIR"; exit 1
}

start() {
  need_redis
  local master
  master=$(master_port)
  master=${master:-${NODES[0]}}
  start_node "$master" ""
  for n in "${NODES[@]}"; do start_node "$n" "$master"; done
  for s in "${SENTINELS[@]}"; do start_sentinel "$s" "$master"; done
  wait_ready "$master"
}

stop() {
  local p pidfile
  for p in "${SENTINELS[@]}" "${NODES[@]}"; do
    port_open "$p" || continue
    log "stopping $p"
    pidfile="$DIR/redis-$p.pid"
    [ -f "$pidfile" ] || pidfile="$DIR/sentinel-$p.pid"
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    for _ in $(seq 1 100); do port_open "$p" || break; sleep 0.05; done
  done
}

# Waits until every sentinel names a master other than $1; prints it.
wait_switch() {
  local old=$1 s now
  for _ in $(seq 1 300); do
    local switched=1
    for s in "${SENTINELS[@]}"; do
      now=$(sentinel_cli "$s" SENTINEL get-master-addr-by-name "$MASTER_NAME" 2>/dev/null | sed -n 2p)
      [ -n "$now" ] && [ "$now" != "$old" ] || switched=0
    done
    [ $switched = 1 ] && { echo "$now"; return; }
    sleep 0.05
  done
  log "no new master after 15 s; logs in $DIR"; exit 1
}

failover() {
  local old new
  old=$(master_port)
  [ -n "$old" ] || { log "not running"; exit 1; }
  sentinel_cli "${SENTINELS[0]}" SENTINEL FAILOVER "$MASTER_NAME" | grep -qx OK
  new=$(wait_switch "$old")
  log "failover: master $old -> $new"
  echo "$new"
}

kill_master() {
  local old new
  old=$(master_port)
  [ -n "$old" ] || { log "not running"; exit 1; }
  kill -9 "$(cat "$DIR/redis-$old.pid")"
  new=$(wait_switch "$old")
  log "master $old killed; new master $new"
  echo "$new"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  failover) failover ;;
  kill) kill_master ;;
  master) master_port ;;
  *) echo "usage: $0 start|stop|failover|kill|master" >&2; exit 2 ;;
esac
