#!/usr/bin/env bash
# The GPU checks, batched: one call per group on a lent GPU machine whose image has torch (docs/gpu.md).
#
#   OUT=/tmp/gpu bash .ci/gpu_checks.sh grade        # every lab's GPU-marked graded tests on the reference
#   OUT=/tmp/gpu bash .ci/gpu_checks.sh bench-01     # lab 01's benchmark, three runs (issue: ratios must hold)
#   OUT=/tmp/gpu bash .ci/gpu_checks.sh bench-kernels      # labs 02 and 07
#   OUT=/tmp/gpu bash .ci/gpu_checks.sh bench-moe-serving  # labs 09 and 08
#   OUT=/tmp/gpu bash .ci/gpu_checks.sh bench-models       # labs 06 and 05 (offload)
# LABS="05 09" adds those labs' GPU-marked tests in front of a bench group.
#
# Every step has its own time limit, so a slow one costs only itself. Logs and JSON are written under a work folder
# and packed into $OUT/<group>.tgz at the end (the device tool returns only a few files), with the summary beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu}
WORK=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$OUT/${1:-usage}-summary.txt") 2>&1
export PYTHONPATH=$PWD/reference:$PWD/labs:$PWD
export NCCL_NVLS_ENABLE=0

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  mkdir -p "$WORK/$name"
  local start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" --out "$WORK/$name" > "$WORK/$name/log.txt" 2>&1
  local rc=$?
  echo "[$name] rc=$rc $(( $(date +%s) - start )) s"
  tail -n 25 "$WORK/$name/log.txt"
}

grade_gpu() {  # grade_gpu NN: only the lab's GPU test file, on the reference
  local lab=$1
  mkdir -p "$WORK/grade"
  local start=$(date +%s)
  timeout --kill-after=10 240 python -m autograder grade "$lab" --target reference --tests test_gpu.py --progress off \
    --json "$WORK/grade/lab$lab.json" > "$WORK/grade/lab$lab.txt" 2>&1
  echo "[grade $lab] rc=$? $(( $(date +%s) - start )) s"
  grep -E "PASS|FAIL|ERROR|not graded|TOTAL" "$WORK/grade/lab$lab.txt" | tail -n 20
  grep -q "FAIL" "$WORK/grade/lab$lab.txt" && grep -v "^ *PASS" "$WORK/grade/lab$lab.txt" | tail -n 60
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

case ${1:-} in
  grade)
    for lab in ${LABS:-01 02 03 04 05 07 08 09}; do grade_gpu $lab; done ;;
  bench-01)
    for run in 1 2 3; do step lab01_run$run 170 python -m lab01_memory.benchmark; done ;;
  bench-kernels)
    for lab in ${LABS:-}; do grade_gpu $lab; done
    step lab02 220 python -m lab02_numerics.benchmark
    step lab07 200 python -m lab07_flash_attention.benchmark --budget-s 90 ;;
  bench-moe-serving)
    for lab in ${LABS:-}; do grade_gpu $lab; done
    step lab09 230 python -m lab09_moe.benchmark --rounds 5
    step lab08 240 python -m lab08_serving.benchmark ;;
  rerun)  # a second run of the kernel benchmarks (spreads must overlap between runs), and lab 01's profile
    step lab07_run2 150 python -m lab07_flash_attention.benchmark --no-sweep
    step lab02_run2 200 python -m lab02_numerics.benchmark
    step lab01_profile 120 python -m lab01_memory.benchmark --profile --rounds 3 ;;
  bench-models)
    for lab in ${LABS:-}; do grade_gpu $lab; done
    step lab06 200 python -m lab06_lora.benchmark
    step lab05_offload 120 python -m lab05_zero.benchmark --offload ;;
  grade-bench-01)
    for lab in ${LABS:-05 09}; do grade_gpu $lab; done
    for run in 1 2 3; do step lab01_run$run 150 python -m lab01_memory.benchmark; done ;;
  *)
    echo "usage: OUT=DIR bash .ci/gpu_checks.sh grade|grade-bench-01|bench-01|bench-kernels|bench-moe-serving|bench-models|rerun" >&2
    exit 2 ;;
esac

tar czf "$OUT/${1:-usage}.tgz" -C "$WORK" .
