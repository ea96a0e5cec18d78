#!/usr/bin/env bash
# One loaded run of the integration suite (issue 21): a CPU burner on one core for the whole
# run, the load average sampled once a minute. Results: docs/drills/loaded-suite-runs.json.
# usage: scripts/loaded-suite-run.sh CLONE_DIR RUN_LABEL OUT_DIR
#   CLONE_DIR: a fresh clone next to the main checkout (so ../shared/datasets resolves);
#   writes OUT_DIR/RUN_LABEL.{meta,log,load}. Needs the shared stack up (never restarted).
set -u
clone=$1; label=$2; out=$3
mkdir -p "$out"
cd "$clone"
export PYTHONPATH="$clone" STREAM_STATE_DIR=/work/main/.stack
timeout 7200 python -c 'while True: pass' &
burner=$!
(
  while kill -0 $burner 2>/dev/null; do
    echo "$(date -u +%H:%M:%S) load=$(cut -d' ' -f1-3 /proc/loadavg) procs_running=$(grep procs_running /proc/stat | cut -d' ' -f2) pytest_other=$(pgrep -fc 'pytest' ) burner_cpu=$(ps -o %cpu= --ppid $burner | tr -d " ")"
    sleep 60
  done
) > "$out/$label.load" 2>&1 &
sampler=$!
start=$(date +%s)
echo "start $(date -u +%FT%TZ) commit $(git rev-parse HEAD) burner $burner" > "$out/$label.meta"
python -m pytest tests/integration -q -p no:cacheprovider -rfE --durations=25 > "$out/$label.log" 2>&1
rc=$?
end=$(date +%s)
kill $burner 2>/dev/null; wait $burner 2>/dev/null
kill $sampler 2>/dev/null
echo "end $(date -u +%FT%TZ) rc $rc duration_s $((end-start))" >> "$out/$label.meta"
tail -3 "$out/$label.log" >> "$out/$label.meta"
