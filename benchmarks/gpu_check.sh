#!/usr/bin/env bash
# The prepared GPU run: one command on a bare one-GPU machine where torch is installed and nothing
# can be downloaded. Stages (STAGES, in order):
#   tests    the `cuda` tests (tests/test_cuda.py)
#   diag     fractalgen alone (benchmarks/gpu_check.py): the shipped model's 1,000 images in float32
#            and bfloat16, the GPU rows' presets with the time per level, and the shipped model's
#            1,000 images and fractalar_in64's image with compiled (fused) steps inside the graphs,
#            first and second call (DIAG: which)
#   compare  compare.py --device cuda side by side with the official code, one run per side and row
#
#   REFERENCE=path/to/LTH14-fractalgen bash benchmarks/gpu_check.sh
#   STAGES="tests compare" ROWS="ar_in64_b1 huge256_sample" REFERENCE=... bash benchmarks/gpu_check.sh
#
# REFERENCE: a checkout of the official code (needed by compare). REFERENCE_PYTHON: its interpreter,
# a path or a command name (default python3). WHEELS: a folder of wheels to install first (the
# codec's constriction where it is missing). FRACTALGEN_ARGS: options for compare.py's fractalgen
# side, e.g. "--compile" (fused steps inside the graphs; the row is labelled). Results: logs and
# JSON lines under $OUT (default benchmarks/gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-benchmarks/gpu_out}
PY=${PYTHON:-python3}
STAGES=${STAGES:-tests diag compare}
ROWS=${ROWS:-ar_in64_b1 shipped_sample mar_in64_sample mar_in64_train_b32 huge256_sample}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site "$WHEELS"/*.whl &&
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git log -1 --format='commit %h %s' 2>/dev/null; } | tee "$OUT/machine.txt"

diag() {  # name, then gpu_check.py options
  local name=$1; shift
  timeout "${DIAG_TIMEOUT:-150}" "$PY" benchmarks/gpu_check.py --out "$OUT/diag.jsonl" "$name" "$@" 2>&1 |
    grep -v "^\s*$" | tee -a "$OUT/diag.log"
}

for stage in $STAGES; do
  case $stage in
    tests)
      timeout "${TESTS_TIMEOUT:-240}" "$PY" -m pytest -m cuda tests/test_cuda.py -q -rs --durations=5 2>&1 |
        tee "$OUT/cuda_tests.log" ;;
    diag)
      for name in ${DIAG:-fmnist-ar fmnist-ar-compiled fractalar_in64 fractalar_in64-compiled fractalmar_in64 \
                         fractalmar_huge_in256}; do
        case $name in
          fmnist-ar) for dtype in float32 bfloat16; do diag fmnist-ar --batches 1000,1000 --dtype $dtype; done ;;
          fmnist-ar-compiled) diag fmnist-ar --batches 1000,1000 --warmup-batch 0 --dtype float32 --compile default ;;
          fractalar_in64) diag fractalar_in64 --batches 1 --dtype float32 --split ;;
          fractalar_in64-compiled) DIAG_TIMEOUT=${COMPILE_TIMEOUT:-300} diag fractalar_in64 --batches 1,1 \
                                     --warmup-batch 0 --dtype float32 --compile default ;;
          fractalmar_in64) diag fractalmar_in64 --batches 8 --num-iter 8,4 --dtype float32 --split ;;
          fractalmar_huge_in256) diag fractalmar_huge_in256 --batches 16 --dtype bfloat16 --split ;;
          *) echo "gpu_check.sh: no diagnostic for $name" >&2 ;;
        esac
      done ;;
    compare)
      "$PY" benchmarks/compare.py --device cuda --reference "${REFERENCE:?set REFERENCE to the official checkout}" \
        --reference-python "${REFERENCE_PYTHON:-$PY}" --rows $ROWS --repeats 1 --no-split \
        ${FRACTALGEN_ARGS:+--fractalgen-args="$FRACTALGEN_ARGS"} \
        --out "$OUT/compare.jsonl" 2>&1 | tee "$OUT/compare.log" ;;
    *) echo "gpu_check.sh: unknown stage $stage (tests, diag, compare)" >&2; exit 2 ;;
  esac
done
