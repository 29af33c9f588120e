"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only` (GPU only; skipped cleanly without one).

A benchmark test takes the `nk_bench` fixture and calls `nk_bench.compare(name, params, variants, ...)`
with the fused variant under the key "fused" and every baseline (eager, torch.compile, SDPA, ...) beside it.
The fused variant is also timed by pytest-benchmark (so `--benchmark-only` runs and reports it; with
`--benchmark-disable` it runs once); all variants are timed with CUDA events by the harness, interleaved and
with the L2 flushed before each timed call (harness.time_variants).

Where the results go:
  * NITROKERNELS_BENCH_JSONL=PATH (set by benchmarks/gpu_driver.py): every case is appended to PATH the moment
    it is measured; nothing is written at session end (the driver builds the results JSON from the JSONL);
  * otherwise the session merges its cases into benchmarks/results/<gpu>-<date>.json at the end, and also into
    NITROKERNELS_BENCH_OUT=DIR when that is set.
NITROKERNELS_BENCH_COMPILE=0 leaves the torch.compile baselines out (harness.compile_baselines()).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import FUSED, Recorder  # noqa: E402

_recorder = Recorder()


class _Bench:
    def __init__(self, benchmark, recorder=None):
        self._benchmark = benchmark
        self._recorder = recorder or _recorder

    def compare(self, name, params, variants, **kwargs):
        fused = variants[FUSED]

        def synced():
            fused()
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        self._benchmark.extra_info.update({"case": name, **{k: str(v) for k, v in params.items()}})
        self._benchmark.pedantic(synced, warmup_rounds=3, rounds=10, iterations=1)
        result = self._recorder.compare(name, params, variants, **kwargs)
        self._benchmark.extra_info["speedup"] = result.speedup
        return result


@pytest.fixture
def nk_bench(benchmark):
    if not torch.cuda.is_available():
        pytest.skip("benchmarks need a CUDA GPU")
    return _Bench(benchmark)


def pytest_sessionfinish(session, exitstatus):
    if _recorder.jsonl:  # every case is already in the JSONL file
        print(f"\n[nitrokernels] {len(_recorder.cases)} benchmark case(s) appended to {_recorder.jsonl}")
        return
    paths = [_recorder.write()]
    if os.environ.get("NITROKERNELS_BENCH_OUT"):
        paths.append(_recorder.write(os.environ["NITROKERNELS_BENCH_OUT"]))
    for path in filter(None, paths):
        print(f"\n[nitrokernels] benchmark results written to {path}")
