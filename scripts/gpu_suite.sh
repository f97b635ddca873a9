#!/usr/bin/env bash
# The whole GPU suite, for the device machine: `bash scripts/gpu_suite.sh [pytest args]`.
# The MPS tests (one process per rank on one GPU) are left out until they have run green:
# `bash scripts/gpu_suite.sh -m mps` runs only them.
# Writes the log and JUnit XML under $OUT (or /tmp/arfusion-gpu) and prints a short
# table last. Triton's cache lives in .triton-cache (carry it to skip recompiling).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 TRITON_CACHE_DIR=$PWD/.triton-cache
OUT=${OUT:-/tmp/arfusion-gpu}
mkdir -p "$OUT" "$TRITON_CACHE_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest tests/gpu -p no:cacheprovider -q -rA --tb=short --junitxml="$OUT/gpu.xml" \
    -m "not mps" "$@" 2>&1 | tee "$OUT/gpu.log"
status=${PIPESTATUS[0]}
tar -czf "$OUT/triton-cache.tgz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
echo "== GPU suite summary =="
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$OUT/gpu.log" | sed 's/ - .*//' | sort | uniq -c \
    | awk '{printf "%-8s %s\n", $2, $3}'
tail -n 1 "$OUT/gpu.log"
exit "$status"
