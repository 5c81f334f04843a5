#!/usr/bin/env bash
# One-shot GPU sampling check (see benchmarks/README.md): s/image with the official settings in
# bf16 at the largest batch that fits BUDGET seconds per config, random weights.
#   bash benchmarks/gpu_check.sh                 # both configs, 270 s each (fits one 600 s command)
#   BUDGET=300 CONFIGS=fractalmar_huge_in256 bash benchmarks/gpu_check.sh
#   COMPILE=reduce-overhead bash benchmarks/gpu_check.sh   # compiled sampling steps + CUDA graphs
# Results: printed, and appended as JSON lines to $OUT/gpu_results.jsonl (or benchmarks/gpu_results.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-270}
CONFIGS=${CONFIGS:-"fractalmar_huge_in256 fractalmar_in64"}
START=${START:-16}
COMPILE_ARGS=${COMPILE:+--compile $COMPILE}
DEST=${OUT:-benchmarks}/gpu_results.jsonl
PY=$(command -v python3 || command -v python)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# shellcheck disable=SC2086
"$PY" benchmarks/gpu_check.py --budget "$BUDGET" --start "$START" --out "$DEST" $COMPILE_ARGS $CONFIGS 2>&1 | tee "${DEST%.jsonl}.log"
