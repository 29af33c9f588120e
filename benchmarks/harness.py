"""Benchmark harness: CUDA-event timing, device roofline (measured), and the results files.

Every benchmark compares the fused path with its baselines *in the same run* and reports, per case:
median milliseconds of each variant, speedup of the fused variant over each baseline, the op's FLOP / byte
floor on this device (from the measured matmul rate and copy bandwidth, not the datasheet) and the fraction
of that floor the fused variant reaches.

Timing (`time_variants`): the variants of one case are timed interleaved (round after round, each round in a
rotated order, a slow variant's fewer repetitions spread evenly over the rounds) so that clock or thermal drift
hits them all alike, and the L2 cache is flushed before every timed call, outside the timed region (a 256 MB
buffer is zeroed, as triton.testing.do_bench does: the H200's L2 is 60 MB, so a case of a few tens of MB would
otherwise be timed from L2 and its fraction of the floor come out optimistic).
NITROKERNELS_BENCH_L2_FLUSH=0 turns the flush off.

Results: with NITROKERNELS_BENCH_JSONL=PATH every case is appended to that JSON-lines file the moment it has
been measured (one line, flushed and fsync'd), preceded once per process by an "environment" line, so a run
that is killed keeps every case that finished (benchmarks/gpu_driver.py sets it). `Recorder.write` merges the
cases into benchmarks/results/<gpu>-<date>.json (a case measured again replaces its older entry).
NITROKERNELS_BENCH_COMPILE=0 leaves the torch.compile baselines out (`compile_baselines()`; default on).
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import append_jsonl, results_name, write_results  # noqa: E402,F401 (pure-Python results I/O)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FUSED = "fused"
L2_FLUSH_BYTES = 256 * 2**20


def compile_baselines() -> bool:
    """Whether the suites time torch.compile baselines (NITROKERNELS_BENCH_COMPILE, default on)."""
    return os.environ.get("NITROKERNELS_BENCH_COMPILE", "1").strip().lower() not in ("0", "", "false", "no", "off")


class CudaClock:
    """CUDA events on the current stream; `flush()` zeroes a buffer larger than the L2 cache."""

    def __init__(self, flush: bool | None = None):
        if flush is None:
            flush = os.environ.get("NITROKERNELS_BENCH_L2_FLUSH", "1") not in ("0", "")
        self._flush = flush

    def flush(self) -> None:
        if self._flush:
            _flush_buffer().zero_()

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        torch.cuda.synchronize()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end)


class WallClock:
    """Host wall clock with the CudaClock interface (CPU-only callables: tests and stub suites)."""

    def flush(self) -> None:
        pass

    def mark(self) -> float:
        return time.perf_counter()

    def sync(self) -> None:
        pass

    def ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3


@functools.lru_cache(maxsize=None)
def _flush_buffer() -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def _timed(clock, fn, n: int) -> list[float]:
    pairs = []
    for _ in range(n):
        clock.flush()
        start = clock.mark()
        fn()
        pairs.append((start, clock.mark()))
    clock.sync()
    return [clock.ms(s, e) for s, e in pairs]


def time_variants(variants: dict[str, Callable[[], object]], *, warmup: int = 5, reps: int = 30,
                  min_ms_total: float = 50.0, max_reps: int = 1000, clock=None) -> dict[str, float]:
    """Median milliseconds of each variant: warm-up, then interleaved timed calls, L2 flushed before each.

    Each variant gets at least `reps` timed calls, more (up to `max_reps`) when its calls are so short that
    `reps` of them would take less than `min_ms_total` in all (judged from the last warm-up call, which is timed;
    with warmup=0 one call is made for that). The calls of all variants are interleaved:
    round r times every variant due in that round, starting from variant r mod n.
    """
    clock = clock or CudaClock()
    items = list(variants.items())
    estimates = {}
    for w in range(max(warmup, 1)):  # the last warm-up round is timed: it decides how many repetitions a short op needs
        for key, fn in items:
            if w == max(warmup, 1) - 1:
                estimates[key] = _timed(clock, fn, 1)[0]
            else:
                fn()
    counts = {key: reps if est * reps >= min_ms_total else min(max_reps, max(reps, math.ceil(min_ms_total / max(est, 1e-4))))
              for key, est in estimates.items()}
    rounds = max(counts.values(), default=0)
    pairs = {key: [] for key, _ in items}
    for r in range(rounds):
        for i in range(len(items)):
            key, fn = items[(r + i) % len(items)]
            n = counts[key]
            if (r * n) // rounds == ((r + 1) * n) // rounds:  # not due in this round
                continue
            clock.flush()
            start = clock.mark()
            fn()
            pairs[key].append((start, clock.mark()))
    clock.sync()
    return {key: _median([clock.ms(s, e) for s, e in pairs[key]]) for key, _ in items}


def cuda_time_ms(fn: Callable[[], object], *, warmup: int = 5, reps: int = 30, min_ms_total: float = 50.0) -> float:
    """Median wall time of `fn` in milliseconds (CUDA events, L2 flushed before each timed call)."""
    return time_variants({"fn": fn}, warmup=warmup, reps=reps, min_ms_total=min_ms_total)["fn"]


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated during one call of `fn`, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@functools.lru_cache(maxsize=None)
def device_roofline() -> dict:
    """Measured on this GPU: device-to-device copy bandwidth (GB/s) and bf16 / fp32 matmul rates (TFLOP/s)."""
    n_bytes = 1 << 30
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = cuda_time_ms(lambda: dst.copy_(src), reps=20)
    rates = {}
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        ms = cuda_time_ms(lambda: a @ b, reps=10)
        rates[str(dtype).replace("torch.", "")] = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del src, dst
    return {"copy_GBps": 2 * n_bytes / (copy_ms * 1e-3) / 1e9, "matmul_TFLOPs": rates}


def floor_ms(flops: float = 0.0, bytes_moved: float = 0.0, dtype: torch.dtype = torch.bfloat16) -> float:
    """Lower bound on the run time: the larger of the compute time and the memory time on this device."""
    roof = device_roofline()
    rate = roof["matmul_TFLOPs"].get(str(dtype).replace("torch.", ""), roof["matmul_TFLOPs"]["bfloat16"])
    return max(flops / (rate * 1e12), bytes_moved / (roof["copy_GBps"] * 1e9)) * 1e3


@dataclass
class CaseResult:
    name: str
    params: dict
    ms: dict[str, float]
    speedup: dict[str, float] = field(default_factory=dict)
    floor_ms: float | None = None
    fraction_of_floor: float | None = None
    peak_mb: dict[str, float] = field(default_factory=dict)
    notes: str = ""


def _current_test() -> str | None:
    current = os.environ.get("PYTEST_CURRENT_TEST")
    return current.rsplit(" (", 1)[0] if current else None


class Recorder:
    """Collects CaseResults; appends each to the JSONL file at once (when one is set) and writes JSON on demand."""

    def __init__(self, jsonl: str | None = None, clock=None):
        self.cases: list[CaseResult] = []
        self.jsonl = jsonl if jsonl is not None else (os.environ.get("NITROKERNELS_BENCH_JSONL") or None)
        self.clock = clock
        self._environment_written = False

    def compare(self, name: str, params: dict, variants: dict[str, Callable[[], object]], *,
                flops: float = 0.0, bytes_moved: float = 0.0, dtype: torch.dtype = torch.bfloat16,
                memory: bool = False, notes: str = "", warmup: int = 5, reps: int = 30) -> CaseResult:
        """Time every variant (interleaved, L2 flushed) and record ratios and the floor."""
        if FUSED not in variants:
            raise ValueError(f"compare({name!r}): variants must include {FUSED!r}, got {sorted(variants)}")
        variants = {FUSED: variants[FUSED], **{k: v for k, v in variants.items() if k != FUSED}}
        started = time.time()
        ms = time_variants(variants, warmup=warmup, reps=reps, clock=self.clock)
        result = CaseResult(name=name, params=params, ms=ms, notes=notes,
                            speedup={k: ms[k] / ms[FUSED] for k in ms if k != FUSED})
        if flops or bytes_moved:
            result.floor_ms = floor_ms(flops, bytes_moved, dtype)
            result.fraction_of_floor = result.floor_ms / ms[FUSED]
        if memory:
            result.peak_mb = {key: peak_memory_mb(fn) for key, fn in variants.items()}
        self.cases.append(result)
        self._append(result, seconds=time.time() - started)
        return result

    def _append(self, result: CaseResult, seconds: float) -> None:
        if not self.jsonl:
            return
        if not self._environment_written:
            append_jsonl(self.jsonl, {"type": "environment", **self.environment()})
            self._environment_written = True
        append_jsonl(self.jsonl, {"type": "case", "suite": os.environ.get("NITROKERNELS_BENCH_SUITE"),
                                  "test": _current_test(), "seconds": round(seconds, 3),
                                  "time": datetime.datetime.now().isoformat(timespec="seconds"),
                                  **asdict(result)})

    def environment(self) -> dict:
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        try:
            from nitrokernels import _ext
            extension = _ext.extension_status()
        except Exception as err:  # noqa: BLE001 -- reported, never fatal
            extension = f"unknown ({type(err).__name__}: {err})"
        env = {"gpu": "cpu", "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
               "extension": extension, "python": platform.python_version(), "commit": git_commit(),
               "date": datetime.datetime.now().isoformat(timespec="seconds")}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=props.name, gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                       capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                       roofline=device_roofline())
        return env

    def write(self, directory: str = RESULTS_DIR) -> str | None:
        """Merge this session's cases into <directory>/<gpu>-<date>.json (same name + params: replaced)."""
        if not self.cases:
            return None
        return write_results(directory, self.environment(), [asdict(c) for c in self.cases])


def git_commit() -> str | None:
    if os.environ.get("NITROKERNELS_COMMIT"):
        return os.environ["NITROKERNELS_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                       stderr=subprocess.DEVNULL, text=True, timeout=10).strip()
    except (OSError, subprocess.SubprocessError):
        return None


_git_commit = git_commit  # the old private name
