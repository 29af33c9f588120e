#!/usr/bin/env bash
# One GPU session in one command, within a time budget, never losing a result:
#   source .whl/prelude.sh; bash benchmarks/gpu_run.sh "$OUT" [BUDGET_SECONDS=480] [gpu_driver.py options...]
# builds the CUDA extension, runs the -m gpu tests, then each benchmark suite in its own process in priority
# order (heads first) under a timeout planned against the budget (benchmarks/gpu_driver.py says how).
# Every case lands in $OUT/cases.jsonl the moment it is measured; the log is $OUT/gpu_run.log; at the end
# $OUT/<gpu>-<date>.json (also in benchmarks/results/: commit it), .md and .png, and the table is printed last.
# NITROKERNELS_COMMIT=<hash> names the commit in the results where the tree has no .git.
# Options: --compile on|off|auto, --suites heads_ops,heads,..., --no-build, --no-tests (see --help).
set -uo pipefail
OUT_DIR=${1:-/tmp/nitrokernels-gpu}
BUDGET=${2:-480}
shift $(( $# < 2 ? $# : 2 ))
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
# the driver keeps to the budget itself; this outer limit only catches a driver that hangs (it gets SIGTERM
# first and still writes the summary of what finished)
timeout -k 15 $(( ${BUDGET%.*} + 40 )) python3 benchmarks/gpu_driver.py "$OUT_DIR" --budget "$BUDGET" "$@"
rc=$?
if [ "$rc" -ge 124 ] && [ -s "$OUT_DIR/cases.jsonl" ]; then  # driver killed: a table from what the JSONL holds
  echo "gpu_run.sh: the driver was killed (rc $rc); summary of $OUT_DIR/cases.jsonl:"
  python3 benchmarks/report.py "$OUT_DIR/cases.jsonl" --out "$OUT_DIR" --no-chart
fi
exit "$rc"
