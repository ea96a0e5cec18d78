#!/usr/bin/env bash
# Install everything the project needs on a fresh Debian machine (idempotent):
# Redis + Prometheus (promtool) from Debian, Java/Maven if missing (Kafka broker jars come
# from Maven Central via `stream stack up`), and the Python package with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
# TLS certificates for the secured broker (stream stack up kafka-secure) and the TLS tests
command -v openssl >/dev/null || need+=(openssl)
# `stream top` is checked in a real terminal (tests/integration/test_top_terminal.py)
command -v tmux >/dev/null || need+=(tmux)
# compose validation in the unit tests (no Docker engine needed for `config`)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  need+=(docker-compose)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's packages may start their own daemons; the project's stack runs its own on loopback.
for svc in redis-server prometheus; do
  if command -v service >/dev/null && service "$svc" status >/dev/null 2>&1; then
    $SUDO service "$svc" stop >/dev/null 2>&1 || true
  fi
done

PY="${PYTHON:-python3}"
# rocksdb: the optional RocksDB table store (table_store=rocksdb), which the recovery tests use
echo "[setup] pip install -e '.[dev,rocksdb]'"
"$PY" -m pip install -q --disable-pip-version-check -e '.[dev,rocksdb]' 2>&1 | grep -v "Running pip as the 'root' user" || true
echo "[setup] compiling the recommender's numba kernels (cached in stream/__pycache__/numba/<hash of the kernel sources>)"
"$PY" -c "from stream.core.recommender import warm_up; print('[setup] kernels ready in %.1f s' % warm_up())"
"$PY" -c "import stream, faust, river, redis, prometheus_client, rocksdict" # fail loudly if install broke
echo "[setup] done"
