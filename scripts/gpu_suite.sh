#!/usr/bin/env bash
# The whole GPU suite, for the device machine: `bash scripts/gpu_suite.sh [pytest args]`.
# Two pytest runs: the MPS tests first (one process per rank on one GPU: the MPS daemon
# must start before the pytest process creates a CUDA context of its own), then the rest.
# Writes the logs and JUnit XML under $OUT (or /tmp/arfusion-gpu) and prints a short
# table last. Triton's cache lives in .triton-cache (carry it to skip recompiling).
# GPU_SUITE_WARM=J first runs the non-MPS tests compile-only (tests/conftest.py) in J
# parallel shards, which fills a cold cache J times faster than the tests' own first calls.
# GPU_SUITE_PARTS="mps" or "not mps" runs one part only, "" none (default "mps,not mps").
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 TRITON_CACHE_DIR=$PWD/.triton-cache
OUT=${OUT:-/tmp/arfusion-gpu}
mkdir -p "$OUT" "$TRITON_CACHE_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
status=0
if [ "${GPU_SUITE_WARM:-0}" -gt 1 ]; then
    start=$SECONDS
    ids=$(mktemp -d)
    python3 -m pytest tests/gpu -p no:cacheprovider -q --collect-only -m "not mps" \
        | grep "::" > "$ids/all"
    split -n "r/$GPU_SUITE_WARM" "$ids/all" "$ids/shard."
    for shard in "$ids"/shard.*; do
        # shellcheck disable=SC2046 # one node id per line, none with spaces
        ARFUSION_TEST_COMPILE_ONLY=1 timeout 300 python3 -m pytest -p no:cacheprovider -q \
            $(cat "$shard") > "$shard.log" 2>&1 &
    done
    wait
    echo "compile-only warm-up: $(wc -l < "$ids/all") tests in $GPU_SUITE_WARM shards," \
        "$((SECONDS - start)) s, $(ls "$TRITON_CACHE_DIR" | wc -l) cache entries"
fi
IFS=, read -ra parts <<< "${GPU_SUITE_PARTS-mps,not mps}"
[ "${#parts[@]}" -eq 0 ] && exit "$status"  # GPU_SUITE_PARTS="": the warm-up alone
for part in "${parts[@]}"; do
    log="$OUT/gpu-${part// /-}.log"
    python3 -m pytest tests/gpu -p no:cacheprovider -q -rA --tb=short \
        --junitxml="$OUT/gpu-${part// /-}.xml" -m "$part" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 5 ] && rc=0  # nothing selected (e.g. -k picked only the other part)
    [ "$rc" -ne 0 ] && status=$rc
done
echo "== GPU suite summary =="
logs=()
for part in "${parts[@]}"; do logs+=("$OUT/gpu-${part// /-}.log"); done
results=$(cat "${logs[@]}" | grep -E "^(PASSED|FAILED|ERROR|SKIPPED)")
echo "$results" | grep -E "^(FAILED|ERROR)" | sed 's/ - .*//'
echo "$results" | awk '{print $1}' | sort | uniq -c | awk '{printf "%-8s %5d\n", $2, $1}'
for f in "${logs[@]}"; do tail -n 1 "$f"; done
exit "$status"
