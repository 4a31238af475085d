#!/usr/bin/env bash
# A real 3-node RabbitMQ cluster on 127.0.0.1, for tests/cluster_test.sh:
#
#   tests/cluster.sh start        # start r1..r3 (AMQP 5701..5703) and join r2, r3 to r1
#   tests/cluster.sh stop         # stop all three and delete their data
#   tests/cluster.sh kill NODE    # kill -9 one node (r1, r2 or r3; its pid from its PID_FILE)
#   tests/cluster.sh status       # each node: up or down, and the cluster as r1 sees it
#   tests/cluster.sh pid NODE     # the pid of NODE's Erlang VM
#
# Each node has its own node name (rN@localhost), AMQP port (570N), distribution port (2570N),
# data and log directories, pid file and plugins file (no plugins: no management port to clash
# on) under $CLUSTER_DIR. They run as the rabbitmq user, with its Erlang cookie, which they share.
# The single node on 5672 (tests/services.sh) is left alone. Every wait is bounded.
set -euo pipefail

CLUSTER_DIR=${CLUSTER_DIR:-/tmp/machinery-cluster}
CLUSTER_WAIT=${CLUSTER_WAIT:-120}
NODES=(r1 r2 r3)

log() { printf '[cluster] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

index_of() {
  case "$1" in r1) echo 1 ;; r2) echo 2 ;; r3) echo 3 ;; *) log "unknown node '$1' (r1, r2 or r3)"; exit 2 ;; esac
}

as_rabbitmq() {
  if [ "$(id -u)" = 0 ]; then
    # The environment (node_env) sets HOME to the rabbitmq user's, where the shared cookie is.
    runuser -u rabbitmq -- "$@"
  else
    "$@"
  fi
}

# The environment of node $1 (r1..r3), for rabbitmq-server and rabbitmqctl alike.
node_env() {
  local n i dir
  n=$1; i=$(index_of "$n"); dir="$CLUSTER_DIR/$n"
  printf '%s\n' \
    "HOME=/var/lib/rabbitmq" \
    "ERL_EPMD_ADDRESS=127.0.0.1" \
    "RABBITMQ_NODENAME=$n@localhost" \
    "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1" \
    "RABBITMQ_NODE_PORT=570$i" \
    "RABBITMQ_DIST_PORT=2570$i" \
    "RABBITMQ_MNESIA_BASE=$dir/mnesia" \
    "RABBITMQ_LOG_BASE=$dir/log" \
    "RABBITMQ_PID_FILE=$dir/pid" \
    "RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins" \
    "RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf" \
    "RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf" \
    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
}

on_node() { # on_node NODE command...
  local n=$1; shift
  local envs=()
  mapfile -t envs < <(node_env "$n")
  as_rabbitmq env "${envs[@]}" "$@"
}

ctl() { local n=$1; shift; on_node "$n" timeout 60 rabbitmqctl -n "$n@localhost" -q "$@"; }

node_pid() { cat "$CLUSTER_DIR/$1/pid" 2>/dev/null || true; }

node_up() { local pid; pid=$(node_pid "$1"); [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

start_node() {
  local n=$1 i dir
  i=$(index_of "$n"); dir="$CLUSTER_DIR/$n"
  if port_open "570$i" && node_up "$n"; then log "$n: running"; return; fi
  mkdir -p "$dir/mnesia" "$dir/log"
  echo '[].' > "$dir/enabled_plugins"
  : > "$dir/rabbitmq-env.conf"
  # Quorum queues of three nodes on a machine with little disk and memory to spare.
  printf 'disk_free_limit.absolute = 100MB\nvm_memory_high_watermark.relative = 0.2\n' > "$dir/rabbitmq.conf"
  chown -R rabbitmq:rabbitmq "$dir"
  log "$n: starting on 127.0.0.1:570$i"
  on_node "$n" rabbitmq-server -detached
}

wait_node() {
  local n=$1 i deadline
  i=$(index_of "$n"); deadline=$((SECONDS + CLUSTER_WAIT))
  until port_open "570$i"; do
    [ $SECONDS -lt $deadline ] || { log "$n did not open port 570$i in ${CLUSTER_WAIT}s; see $CLUSTER_DIR/$n/log"; exit 1; }
    sleep 0.3
  done
  ctl "$n" await_startup
}

in_cluster() { # in_cluster NODE: whether r1 lists NODE as a running node
  ctl r1 eval 'rabbit_nodes:all_running().' 2>/dev/null | grep -q "$1@localhost"
}

start() {
  # epmd bound to loopback first, or the first Erlang tool starts one on all interfaces.
  pgrep -x epmd >/dev/null || epmd -address 127.0.0.1 -daemon
  mkdir -p "$CLUSTER_DIR"
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in "${NODES[@]}"; do wait_node "$n"; done
  for n in r2 r3; do
    if in_cluster "$n"; then continue; fi
    log "$n: joining r1"
    # (The CLI prints the joining node's start-up warnings; they are noise here.)
    { ctl "$n" stop_app && ctl "$n" reset && ctl "$n" join_cluster r1@localhost &&
      ctl "$n" start_app && ctl "$n" await_startup; } >"$CLUSTER_DIR/$n/join.log" 2>&1 ||
      { cat "$CLUSTER_DIR/$n/join.log" >&2; log "$n could not join r1"; exit 1; }
  done
  status
}

stop() {
  for n in "${NODES[@]}"; do
    if node_up "$n"; then
      log "$n: stopping"
      ctl "$n" stop >/dev/null 2>&1 || kill -9 "$(node_pid "$n")" 2>/dev/null || true
    fi
  done
  for n in "${NODES[@]}"; do
    local pid; pid=$(node_pid "$n")
    for _ in $(seq 1 100); do { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; } || break; sleep 0.2; done
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  done
  rm -rf "$CLUSTER_DIR"
  log "stopped"
}

kill_node() {
  local n=$1 pid
  index_of "$n" >/dev/null
  pid=$(node_pid "$n")
  [ -n "$pid" ] || { log "$n: no pid file"; exit 1; }
  kill -9 "$pid"
  log "$n: killed (pid $pid)"
}

status() {
  local i
  for n in "${NODES[@]}"; do
    i=$(index_of "$n")
    if node_up "$n" && port_open "570$i"; then echo "$n up 570$i pid $(node_pid "$n")"; else echo "$n down 570$i"; fi
  done
  for n in "${NODES[@]}"; do
    if node_up "$n"; then echo "running nodes (as $n sees them): $(ctl "$n" eval 'rabbit_nodes:all_running().' 2>/dev/null)"; break; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  kill) kill_node "${2:?kill NODE (r1, r2 or r3)}" ;;
  pid) node_pid "${2:?pid NODE}" ;;
  status) status ;;
  *) echo "usage: $0 start|stop|kill NODE|pid NODE|status" >&2; exit 2 ;;
esac
