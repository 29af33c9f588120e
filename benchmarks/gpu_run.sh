#!/usr/bin/env bash
# One full GPU session in one command: build the CUDA extension, run the GPU tests and every benchmark suite,
# print the summary table last. On the lent GPU machine (see README, "Measuring on a GPU"):
#   source .whl/prelude.sh; bash benchmarks/gpu_run.sh "$OUT"
# Results: benchmarks/results/<gpu>-<date>.json (commit it) and copies under OUT_DIR.
set -uo pipefail
OUT_DIR=${1:-/tmp/nitrokernels-gpu}
mkdir -p "$OUT_DIR"
export NITROKERNELS_BENCH_OUT="$OUT_DIR" MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
cd "$(dirname "$0")/.."

echo "== build"
NITROKERNELS_BUILD_EXT=1 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$OUT_DIR/build.log"
python3 -m nitrokernels info | tee "$OUT_DIR/info.txt"

echo "== GPU tests"
python3 -m pytest tests -q -x -m "gpu" -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT_DIR/gpu-tests.log"

echo "== benchmarks"
python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-disable-gc \
  ${BENCH_K:+-k "$BENCH_K"} 2>&1 | tail -40 | tee "$OUT_DIR/bench.log"

echo "== summary"
python3 benchmarks/report.py --out "$OUT_DIR"
