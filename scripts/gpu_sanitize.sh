#!/usr/bin/env bash
# compute-sanitizer (memcheck, then racecheck) over the CUDA tests of both compiled
# backends, in one call on a GPU machine. Small shapes only: the sanitizer slows kernels
# down by orders of magnitude. Logs go under $OUT.
#   run: bash scripts/gpu_sanitize.sh        (after scripts/gpu_check.sh has built the package)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
SEL=${SEL:-"(triton-cuda or cuda-cuda) and not gradcheck and not 2_pow_31 and not compile"}
TESTS=${TESTS:-"tests/test_add_relu.py tests/test_conv_bn_relu.py"}
rc=0
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  # --target-processes all: Triton compiles in the test process; --error-exitcode makes a
  # finding fail the run.
  timeout ${SAN_TIMEOUT:-280} "$SAN" --tool "$tool" --target-processes all --error-exitcode 99 \
    --print-limit 20 python3 -m pytest -q -x -p no:cacheprovider $TESTS -k "$SEL" > "$OUT/sanitize_$tool.log" 2>&1
  r=$?
  echo "$tool rc=$r"; tail -5 "$OUT/sanitize_$tool.log"
  [ $r -ne 0 ] && rc=$r
done
exit $rc
