"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only` (GPU only; skipped cleanly without one).

A benchmark test takes the `nk_bench` fixture and calls `nk_bench.compare(name, params, variants, ...)`
with the fused variant under the key "fused" and every baseline (eager, torch.compile, SDPA, ...) beside it.
The fused variant is also timed by pytest-benchmark (so `--benchmark-only` runs and reports it); all variants
are timed with CUDA events by the harness, and the session writes benchmarks/results/<gpu>-<date>.json.
Set NITROKERNELS_BENCH_OUT=DIR to write the JSON elsewhere as well (e.g. $OUT on a lent GPU machine).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import FUSED, Recorder  # noqa: E402

_recorder = Recorder()


class _Bench:
    def __init__(self, benchmark):
        self._benchmark = benchmark

    def compare(self, name, params, variants, **kwargs):
        fused = variants[FUSED]

        def synced():
            fused()
            torch.cuda.synchronize()

        self._benchmark.extra_info.update({"case": name, **{k: str(v) for k, v in params.items()}})
        self._benchmark.pedantic(synced, warmup_rounds=3, rounds=10, iterations=1)
        result = _recorder.compare(name, params, variants, **kwargs)
        self._benchmark.extra_info["speedup"] = result.speedup
        return result


@pytest.fixture
def nk_bench(benchmark):
    if not torch.cuda.is_available():
        pytest.skip("benchmarks need a CUDA GPU")
    return _Bench(benchmark)


def pytest_sessionfinish(session, exitstatus):
    paths = [_recorder.write()]
    if os.environ.get("NITROKERNELS_BENCH_OUT"):
        paths.append(_recorder.write(os.environ["NITROKERNELS_BENCH_OUT"]))
    for path in filter(None, paths):
        print(f"\n[nitrokernels] benchmark results written to {path}")
