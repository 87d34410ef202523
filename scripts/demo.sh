#!/usr/bin/env bash
# The tiny six-stage chain through a real `ray job submit` on a local Ray head of our own.
# Everything binds to 127.0.0.1; the head is stopped by its PID at exit (never `ray stop`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0      # GCS, raylet and workers bind loopback
export RAY_AUTH_MODE=token                       # `ray start --head` enables token auth
RUNS="${RAYLONG_RUNS:-$PWD/runs}"
PIPELINE_ID="${PIPELINE_ID:-tiny-$(date +%Y%m%d-%H%M%S)}"
RECIPE="${RECIPE:-jobs/recipes/tiny.yaml}"
mkdir -p "$RUNS"
export MLFLOW_TRACKING_URI="sqlite:///$RUNS/mlflow.db"

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GCS_PORT=$(free_port); DASH_PORT=$(free_port)
RAY_TMP=$(mktemp -d /tmp/rl-ray.XXXX)
# `ray start --head` enables token auth but, unlike ray.init(), does not create a token: on a fresh machine
# (no ~/.ray/auth_token) it refuses to start. Create one if missing (it is printed: keep it off the console).
ray get-auth-token --generate > /dev/null

ray start --head --block --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
    --port="$GCS_PORT" --dashboard-port="$DASH_PORT" --temp-dir="$RAY_TMP" \
    --ray-client-server-port="$(free_port)" --min-worker-port=20000 --max-worker-port=20999 \
    > "$RAY_TMP/head.log" 2>&1 &
HEAD_PID=$!
cleanup() { kill "$HEAD_PID" 2>/dev/null || true; wait "$HEAD_PID" 2>/dev/null || true; }
trap cleanup EXIT

export RAY_ADDRESS="http://127.0.0.1:$DASH_PORT"
for _ in $(seq 1 90); do
    if ray job list >/dev/null 2>&1; then break; fi
    kill -0 "$HEAD_PID" 2>/dev/null || { cat "$RAY_TMP/head.log"; exit 1; }
    sleep 1
done
echo "[demo] Ray head pid $HEAD_PID, dashboard $RAY_ADDRESS, pipeline $PIPELINE_ID, results in $RUNS"

START=$(date +%s)
ray job submit --working-dir . \
    --runtime-env-json "{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"$MLFLOW_TRACKING_URI\", \"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER\": \"0\"}}" \
    -- python jobs/pipeline.py --recipe "$RECIPE" --pipeline-id "$PIPELINE_ID" --storage-path "$RUNS"
echo "[demo] job finished in $(( $(date +%s) - START ))s; per-stage table read back from MLflow:"
python -m raylong.cli report "$PIPELINE_ID" --storage-path "$RUNS"
