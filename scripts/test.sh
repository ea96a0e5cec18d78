#!/usr/bin/env bash
# Set everything up, start the local stack (real Kafka, Redis, Prometheus), run the whole
# test suite, and stop the services this script started -- also when tests fail.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1

started=()
for svc in kafka redis prometheus; do
  if ! stream stack status 2>/dev/null | grep -qE "^$svc +ready"; then started+=("$svc"); fi
done
cleanup() {
  if [ ${#started[@]} -gt 0 ]; then stream stack down "${started[@]}" || true; fi
}
trap cleanup EXIT INT TERM

stream stack up || exit 1
python3 -m pytest "$@"
