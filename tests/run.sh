#!/usr/bin/env bash
# The project's test command (the README's second command; CI runs it too):
# installs and starts RabbitMQ and Redis on 127.0.0.1 when needed, then runs every test in the
# workspace: unit tests, doc tests, the trybuild UI tests and the integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/services.sh start
# The Sentinel tests start their own Redis deployment (tests/sentinel.sh); stop it afterwards.
trap 'tests/sentinel.sh stop >/dev/null 2>&1 || true' EXIT
cargo test --workspace --locked "$@"
