#!/usr/bin/env bash
# The Redis Sentinel failover test, apart from the main suite (tests/run.sh): starts RabbitMQ and
# Redis (tests/services.sh) and the Sentinel deployment (tests/sentinel.sh: a master, a replica
# and three sentinels on loopback), runs the 2,000-task failover test, stops the deployment.
#
#   tests/sentinel_test.sh                  # SENTINEL FAILOVER during the run
#   SENTINEL_KILL=1 tests/sentinel_test.sh  # kill -9 of the master instead
set -euo pipefail
cd "$(dirname "$0")/.."
tests/services.sh start
trap 'tests/sentinel.sh stop' EXIT
cargo test -p machinery-tests --test sentinel --locked -- --ignored --nocapture "$@"
