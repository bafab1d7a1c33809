#!/usr/bin/env bash
# The GPU-proof run (issue 13) in device calls of at most 10 minutes, on a machine with
# torch 2.11 / triton 3.6 and no network. Every stage builds first unless the extension is
# already importable (a warm machine keeps the in-place build and Triton's cache), and stays
# inside a deadline of $BUDGET seconds (default 570). Everything is written under $OUT/proof
# and packed into $OUT/proof.tgz (the device tool brings back at most 8 files).
#   STAGE=numbers  build, warm Triton's and inductor's caches in parallel, ResNet-50 bf16
#                  channels_last model benchmarks (eager, eager-cl, compile, fused-triton,
#                  fused-cuda, fused-auto at batches 1 and 256, infer and train; CUDA-graph
#                  variants at b1); fused-auto's decisions -> proof/tuning_table.json
#   STAGE=suite    the per-layer op benchmark (batch 256 bf16; eager, conv alone, ours per backend;
#                  GPU time by CUDA-graph replay), then the CUDA test suite
#   STAGE=infer    the inference and CUDA-graph rows again (after a fix), training-step
#                  profiles, then the suite
#   STAGE=host     host time per conv layer (scripts/host_overhead.py: fast path, custom op,
#                  eager), the training step under torch.compile(mode="reduce-overhead") (CUDA
#                  graphs) for eager and fused models, and the training-step profiles
#   STAGE=extra    compute-sanitizer (memcheck, racecheck) and the 100-step bf16 curves
#   STAGE=gputests the tests marked gpu alone (every CUDA case, no CPU-only test), as time allows
#   STAGE=second   torch.compile's model rows (NO_COMPILE=1: skipped, when STAGE=numbers reached
#                  them), then as STAGE=gputests
# A session now gets 15 minutes of device time, its machine's start included (README of the device
# tool): call 1 STAGE=numbers (timeout_s 600), then at once, on the still-warm machine (it keeps the
# build, Triton's and inductor's caches for 30 s), call 2 STAGE=second BUDGET=<what is left, minus a
# minute>. The other stages are for later sessions, one call each.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
STAGE=${STAGE:-numbers}
BUDGET=${BUDGET:-570}
P="$OUT/proof"
mkdir -p "$P"
export PYTHONUNBUFFERED=1 MAX_JOBS=16
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# run NAME SECONDS CMD...: at most SECONDS, never past the deadline (minus a margin to pack up)
run() {
  local name=$1 want=$2; shift 2
  local t=$(( $(left) - 25 )); [ "$t" -gt "$want" ] && t=$want
  if [ "$t" -lt 15 ]; then echo "== $name: skipped (deadline)"; return 0; fi
  echo "== $name (limit ${t}s)"
  local t0=$(date +%s)
  timeout "$t" "$@" > "$P/$name.log" 2>&1
  local rc=$?
  echo "   $name rc=$rc in $(( $(date +%s) - t0 ))s"
  return $rc
}
pack() { tar -czf "$OUT/proof.tgz" -C "$OUT" proof; echo "packed: $(du -h "$OUT/proof.tgz" | cut -f1)"; }
trap pack EXIT

{
  date -u; echo "commit $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain | head -5 | tr '\n' ' ')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, triton, torchvision; print('torch', torch.__version__, 'triton', triton.__version__, 'torchvision', torchvision.__version__, 'cudnn', torch.backends.cudnn.version())"
  nproc
} > "$P/env.log" 2>&1
cat "$P/env.log"

if python3 -c "import resnet_fused, sys; sys.exit('cuda' not in resnet_fused.available_backends())" 2>/dev/null; then
  echo "== build: already built"
else
  TORCH_CUDA_ARCH_LIST=9.0 RESNET_FUSED_BUILD_CUDA=1 run build 240 \
    python3 -m pip install --no-build-isolation --no-deps -e . || { tail -30 "$P/build.log"; exit 1; }
fi
python3 -c "import resnet_fused, json; print(json.dumps(resnet_fused.build_info()))" | tee "$P/build_info.json"

bench() {  # bench NAME SECONDS run.py-args...
  local name=$1 t=$2; shift 2
  run "$name" "$t" python3 benchmarks/run.py --out "$P/$name" "$@"
  grep -E "^\| resnet50|^\| (conv_bn_relu|add_relu)|failed" "$P/$name.log" | head -80
}

if [ "$STAGE" = numbers ] || [ "$STAGE" = host ]; then
  # the BatchNorm kernels of both backends against float64, first (rewritten without a GPU at
  # 2026-11-23: a wrong kernel would void the numbers after it); seconds
  RESNET_FUSED_REQUIRE_CUDA_EXT=1 run bnk 90 python3 -m pytest -q -p no:cacheprovider tests/test_bn_kernels.py
  tail -3 "$P/bnk.log"
fi

if [ "$STAGE" = numbers ]; then
  run warm 200 python3 scripts/warm_caches.py --compile --batches 1,256 --workers 13
  pkill -f warm_caches.py 2>/dev/null; pkill -f multiprocessing.spawn 2>/dev/null; tail -3 "$P/warm.log"; grep -A8 FAIL "$P/warm.log" | head -40
  # (in the order of what a 15-minute lease must bring back first: ours, the eager baselines, the
  # batch-1 graphs, fused-auto; torch.compile's rows, the slowest to build, in STAGE=second if the
  # deadline comes first)
  bench m_triton 110 --no-ops --impls fused-triton
  bench m_cuda 60 --no-ops --impls fused-cuda
  bench m_eager 60 --no-ops --impls eager,eager-cl
  bench m_graph 80 --no-ops --modes infer --batches 1 --impls eager-cl-graph,fused-triton-graph,fused-cuda-graph,fused-auto-graph
  # fused-auto: the per-layer choice, timed on first use; its decisions (the cache file) are the
  # tuning table to commit as resnet_fused/tuning/<gpu>.json
  RESNET_FUSED_CACHE_DIR="$P/cache" bench m_auto 120 --no-ops --impls fused-auto
  cp "$P"/cache/selection-*.json "$P/tuning_table.json" 2>/dev/null && echo "tuning table: $P/tuning_table.json"
  bench m_compile 200 --no-ops --impls compile
fi

if [ "$STAGE" = second ]; then  # the second call of a 15-minute lease, on the warm machine
  # ($OUT comes back empty: NO_COMPILE=1 when call 1's m_compile.log shows its rows)
  [ -n "${NO_COMPILE:-}" ] || bench m_compile 200 --no-ops --impls compile
fi

if [ "$STAGE" = suite ]; then
  # (GPU times by CUDA-graph replay, 10 calls per graph; a timeout writes no CSV: a generous limit)
  bench ops 280 --no-models --op-iters 10
fi

if [ "$STAGE" = infer ]; then  # the inference rows again (after a fix), then the suite with what time is left
  run warm 120 python3 scripts/warm_caches.py --modes eval-folded --batches 1,256 --workers 13
  pkill -f multiprocessing.spawn 2>/dev/null; tail -1 "$P/warm.log"; grep -A8 FAIL "$P/warm.log" | head -20
  bench m_infer 100 --no-ops --modes infer --impls fused-triton,fused-cuda
  bench m_graph 80 --no-ops --modes infer --batches 1 --impls eager-cl-graph,fused-triton-graph,fused-cuda-graph
  for spec in "fused-cuda train" "fused-triton train"; do
    set -- $spec
    run "prof_$1_$2" 45 python3 scripts/profile_step.py --impl "$1" --mode "$2" --top 25
    head -1 "$P/prof_$1_$2.log"
  done
fi

if [ "$STAGE" = host ]; then  # docs/perf.md lead 9
  for b in cuda triton; do
    run "host_$b" 40 python3 scripts/host_overhead.py --device cuda --backend "$b"; tail -8 "$P/host_$b.log"
  done
  # (-keepz: every conv output kept, no recompute: the speed side of docs/perf.md lead 13's trade)
  bench m_ro 300 --no-ops --modes train,infer --batches 256 --impls eager-cl,compile-ro,fused-cuda-ro,fused-triton-ro,fused-cuda,fused-triton,fused-cuda-keepz
  for spec in "fused-cuda train" "fused-triton train"; do
    set -- $spec
    run "prof_$1_$2" 45 python3 scripts/profile_step.py --impl "$1" --mode "$2" --top 25
    head -1 "$P/prof_$1_$2.log"
  done
  # lead 9 steps 3 and 4: the same step through the Python autograd node over the C++ calls, and
  # through the Python orchestration (launch count and wall time)
  run prof_fused-cuda_train_pynode 45 python3 scripts/profile_step.py --impl fused-cuda --mode train --top 25 \
    --cuda-train-path c++
  head -1 "$P/prof_fused-cuda_train_pynode.log"
  run prof_fused-cuda_train_python 45 python3 scripts/profile_step.py --impl fused-cuda --mode train --top 25 \
    --cuda-train-path python
  head -1 "$P/prof_fused-cuda_train_python.log"
  # lead 15: without the shortcut's gradient joined in the Bottleneck's first dgrad (autograd's add_
  # and cuDNN's dgrad instead of one accumulating GEMM)
  RESNET_FUSED_SHORTCUT_JOIN=0 run prof_fused-cuda_train_nojoin 45 python3 scripts/profile_step.py --impl fused-cuda \
    --mode train --top 25
  head -1 "$P/prof_fused-cuda_train_nojoin.log"
  # lead 17: cuDNN's stem with its input padded to 4 channels (the ops rows op=conv give the kernels)
  RESNET_FUSED_CUDNN_STEM_PAD=4 bench m_stempad 150 --no-ops --batches 256 --impls fused-cuda
fi

if [ "$STAGE" = gputests ] || [ "$STAGE" = second ]; then TEST_ARGS=${TEST_ARGS:-"-m gpu tests"}; fi
if [ "$STAGE" = suite ] || [ "$STAGE" = infer ] || [ "$STAGE" = gputests ] || [ "$STAGE" = second ]; then
  # -v: a run stopped at its deadline still names every test that finished; --timeout: a hung
  # test fails with its traceback instead of eating the call
  par=""; python3 -c "import xdist" 2>/dev/null && par="-n ${TEST_WORKERS:-12} --dist worksteal"
  # OMP_NUM_THREADS: one CPU thread per worker (14 workers x 16 torch threads made the CPU tests
  # crawl on the GPU machine and left 6 of 440 unfinished in 385 s)
  OMP_NUM_THREADS=1 RESNET_FUSED_TUNE_BUDGET=0 RESNET_FUSED_AUTOTUNE=0 RESNET_FUSED_REQUIRE_CUDA_EXT=1 RESNET_FUSED_REQUIRE_TRITON=1 HYPOTHESIS_PROFILE=gpu \
    run tests 480 python3 -m pytest -v -rfEs -p no:cacheprovider --timeout=240 --durations=30 $par ${TEST_ARGS:-tests}
  grep -cE " PASSED " "$P/tests.log"; grep -E "passed|failed|error" "$P/tests.log" | tail -3
  grep -E "(FAILED|ERROR) " "$P/tests.log" | head -40
fi

if [ "$STAGE" = extra ]; then
  OUT="$P" run sanitize 300 bash scripts/gpu_sanitize.sh
  grep -E "rc=|ERROR SUMMARY|passed|failed" "$P/sanitize.log" | head
  run curve 240 python3 benchmarks/train_curve.py --out "$P/curve"
  tail -5 "$P/curve.log"
fi
echo "stage $STAGE done in $(( $(date +%s) - START ))s"
