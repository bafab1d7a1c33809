#!/usr/bin/env bash
# Everything a lent GPU machine (torch 2.11 / triton 3.6, no network) should run, writing
# logs and results under $OUT (8 files at most: build.log, tests.log, bench.log and bench/ with
# models.csv, ops.csv, summary.md, throughput.png, layers.png). Stages, so that each device call
# stays under its 10-minute limit:
#   STAGE=tests bash scripts/gpu_check.sh   build in place + the whole suite on CUDA, every backend
#   STAGE=bench bash scripts/gpu_check.sh   build in place (no-op if built) + benchmarks/run.py
#   STAGE=curve bash scripts/gpu_check.sh   build + 100-step bf16 loss curves, eager vs fused (issue 7)
#   STAGE=build bash scripts/gpu_check.sh   build only (e.g. before scripts/gpu_sanitize.sh)
#   bash scripts/gpu_check.sh               all in one call under 10 minutes: build, tests (6 min at
#                                           most), a quick benchmark (batch 256, no torch.compile, no ops)
# BENCH_ARGS="..." passes flags to benchmarks/run.py; TEST_ARGS="..." replaces the test selection.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
STAGE=${STAGE:-all}
if [ "$STAGE" = all ]; then
  : "${TEST_TIMEOUT:=360}" "${BENCH_TIMEOUT:=170}"
  : "${BENCH_ARGS:=--batches 256 --impls eager,eager-cl,fused-triton,fused-cuda --no-ops}"
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  date -u; git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/build.log" 2>&1
cat "$OUT/build.log"

echo "== build (sm_90 only, to save time)"
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} RESNET_FUSED_BUILD_CUDA=1 \
  python3 -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - t0 )) s"; tail -2 "$OUT/build.log"
python3 -c "import resnet_fused, json; print(json.dumps(resnet_fused.build_info()))"

if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
  echo "== tests on CUDA, every backend (fixed Triton tile config: no tuning time)"
  t0=$(date +%s)
  # Triton compiles on the CPU, one kernel specialization at a time per process: pytest-xdist
  # (in the GPU image) spreads that over the 16 cores; the tests share the one GPU.
  par=""
  python3 -c "import xdist" 2>/dev/null && par="-n ${TEST_WORKERS:-8}"
  # OMP_NUM_THREADS: one CPU thread per worker (14 workers x 16 torch threads made the CPU tests
  # crawl on the GPU machine and left 6 of 440 unfinished in 385 s)
  OMP_NUM_THREADS=1 RESNET_FUSED_TUNE_BUDGET=0 RESNET_FUSED_AUTOTUNE=0 RESNET_FUSED_REQUIRE_CUDA_EXT=1 RESNET_FUSED_REQUIRE_TRITON=1 HYPOTHESIS_PROFILE=gpu \
    timeout ${TEST_TIMEOUT:-500} python3 -m pytest -q -rs -p no:cacheprovider --durations=15 $par \
    ${TEST_ARGS:-tests} > "$OUT/tests.log" 2>&1
  echo "tests rc=$? in $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
fi

if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  echo "== benchmarks"
  t0=$(date +%s)
  timeout ${BENCH_TIMEOUT:-540} python3 benchmarks/run.py --out "$OUT/bench" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  echo "bench rc=$? in $(( $(date +%s) - t0 )) s"; tail -60 "$OUT/bench.log"
  # $OUT/bench/{models,ops}.csv hold this run's rows (with a status column): append the ok rows
  # to benchmarks/results/ on the machine that commits.
fi

if [ "$STAGE" = curve ]; then
  echo "== 100-step training curves"
  timeout ${CURVE_TIMEOUT:-540} python3 benchmarks/train_curve.py --out "$OUT/curve" ${CURVE_ARGS:-} > "$OUT/curve.log" 2>&1
  echo "curve rc=$?"; tail -5 "$OUT/curve.log"
fi
