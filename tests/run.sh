#!/usr/bin/env bash
# The project's test command (the README's second command; CI runs it too):
# installs and starts RabbitMQ and Redis on 127.0.0.1 when needed, then runs every test in the
# workspace: unit tests, doc tests, the trybuild UI tests and the integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# One run at a time on this machine: the sweep below must not delete the queues of a run in
# progress.
exec 9>"${TMPDIR:-/tmp}/machinery-tests.lock"
flock 9
tests/services.sh start
# Deletes the queues and exchanges test runs left on the local RabbitMQ (a failed or killed test
# leaves its own); the binary comes with the tests' build, so the first run sweeps at its end.
sweep() {
  local bin="${CARGO_TARGET_DIR:-target}/debug/machinery-test-sweep"
  if [ -x "$bin" ]; then "$bin" || true; fi
}
sweep
# The Sentinel tests start their own Redis deployment (tests/sentinel.sh); stop it afterwards.
trap 'tests/sentinel.sh stop >/dev/null 2>&1 || true; sweep' EXIT
cargo test --workspace --locked "$@"
