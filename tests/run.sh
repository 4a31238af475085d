#!/usr/bin/env bash
# The project's test command (the README's second command; CI runs it too):
# installs and starts RabbitMQ and Redis on 127.0.0.1 when needed, then runs every test in the
# workspace: unit tests, doc tests, the trybuild UI tests and the integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# One run at a time on this machine: the sweep below must not delete the queues of a run in
# progress. Every command below gets `9>&-`, so that no server it starts (Redis daemonizes)
# keeps the lock after this run.
LOCK=/tmp/machinery-tests.lock
command -v flock >/dev/null || { echo "tests/run.sh: needs flock (util-linux)" >&2; exit 1; }
exec 9>>"$LOCK" || { echo "tests/run.sh: cannot open the lock file $LOCK" >&2; exit 1; }
# flock exits 200 when the lock is held (-E), anything else when it cannot lock at all.
held=0
flock -n -E 200 9 || held=$?
if [ "$held" = 200 ]; then
  echo "tests/run.sh: another run holds $LOCK; waiting for it (an hour at most)" >&2
  held=0
  flock -w 3600 -E 200 9 || held=$?
fi
if [ "$held" = 200 ]; then
  echo "tests/run.sh: another run held $LOCK for an hour; giving up" >&2
  exit 1
elif [ "$held" != 0 ]; then
  echo "tests/run.sh: cannot lock $LOCK (flock exited $held)" >&2
  exit 1
fi
tests/services.sh start 9>&-
# Deletes the queues and exchanges test runs left on the local RabbitMQ (a failed or killed test
# leaves its own); the binary comes with the tests' build, so the first run sweeps at its end.
sweep() {
  local bin="${CARGO_TARGET_DIR:-target}/debug/machinery-test-sweep"
  if [ -x "$bin" ]; then "$bin" 9>&- || true; fi
}
sweep
# The Sentinel tests start their own Redis deployment (tests/sentinel.sh); stop it afterwards.
trap 'tests/sentinel.sh stop >/dev/null 2>&1 9>&- || true; sweep' EXIT
cargo test --workspace --locked "$@" 9>&-
