#!/usr/bin/env bash
# GPU check for one H200 (run through the device tool; never needed by CI). Finishes within ~8 minutes:
# an 8-layer Llama-3.1-8B-shaped model through raylong's engine at doubling lengths with ALST switches on.
# The device image has torch/transformers; deepspeed, pydantic and mlflow are installed from wheels carried
# in .whl/ (see docs/benchmarks.md) when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import deepspeed, pydantic, einops, pyarrow" 2>/dev/null; then
    $PY -m pip install -q --no-index --find-links .whl deepspeed pydantic hjson ninja py-cpuinfo msgpack einops pyarrow
fi
nvidia-smi --query-gpu=name,memory.total --format=csv
PYTHONPATH=$PWD timeout 480 $PY bench/gpu_check.py --layers "${LAYERS:-8}" --budget-s 380
