#!/usr/bin/env bash
# Everything a lent GPU machine (torch 2.11 / triton 3.6, no network) should run, in one
# call: build in place, the full test suite on CUDA for every backend, the benchmarks.
# Logs and results go under $OUT (at most 8 files come back, so keep it to a few).
#   run: bash scripts/gpu_check.sh            (BENCH_ARGS="..." to pass benchmark flags)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  date -u; git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== build (sm_90 only, to save time)"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} RESNET_FUSED_BUILD_CUDA=1 \
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
echo "build rc=$?"; tail -3 "$OUT/build.log"

echo "== tests on CUDA, every backend"
RESNET_FUSED_REQUIRE_CUDA_EXT=1 RESNET_FUSED_REQUIRE_TRITON=1 \
  timeout ${TEST_TIMEOUT:-360} python3 -m pytest -q -rs -x -p no:cacheprovider ${TEST_ARGS:-tests} > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -15 "$OUT/tests.log"

echo "== benchmarks"
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/run.py --out "$OUT/bench" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -40 "$OUT/bench.log"
