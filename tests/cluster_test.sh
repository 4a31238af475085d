#!/usr/bin/env bash
# The RabbitMQ cluster test, apart from the main suite (tests/run.sh): three RabbitMQ nodes on a
# 2-core machine are heavy. Starts a 3-node cluster on 127.0.0.1:5701..5703 (tests/cluster.sh)
# and Redis (tests/services.sh, for the results), runs tests/tests/cluster.rs, stops the cluster.
#
#   tests/cluster_test.sh            # one run
#   RUNS=3 tests/cluster_test.sh     # three runs, each on a fresh cluster
set -euo pipefail
cd "$(dirname "$0")/.."
tests/services.sh start
cargo test -p machinery-tests --test cluster --locked --no-run
trap 'tests/cluster.sh stop' EXIT
for run in $(seq 1 "${RUNS:-1}"); do
  echo "[cluster_test] run $run of ${RUNS:-1}" >&2
  tests/cluster.sh start
  MACHINERY_CLUSTER=1 cargo test -p machinery-tests --test cluster --locked -- --ignored --nocapture "$@"
  tests/cluster.sh stop
done
