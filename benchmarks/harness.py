"""Benchmark harness: CUDA-event timing, device roofline (measured), and the results file.

Every benchmark compares the fused path with its baselines *in the same run* and reports, per case:
median milliseconds of each variant, speedup of the fused variant over each baseline, the op's FLOP / byte
floor on this device (from the measured matmul rate and copy bandwidth, not the datasheet) and the fraction
of that floor the fused variant reaches.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FUSED = "fused"


def cuda_time_ms(fn: Callable[[], object], *, warmup: int = 5, reps: int = 30, min_ms_total: float = 50.0) -> float:
    """Median wall time of `fn` in milliseconds, measured with CUDA events around each call after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    median = times[len(times) // 2]
    if median * reps < min_ms_total and reps < 1000:  # very short ops: repeat for a steadier median
        return cuda_time_ms(fn, warmup=0, reps=min(1000, int(reps * min_ms_total / max(median * reps, 1e-3)) + 1))
    return median


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


class Recorder:
    """Collects CaseResults during a pytest session and writes one JSON file at the end."""

    def __init__(self):
        self.cases: list[CaseResult] = []

    def compare(self, name: str, params: dict, variants: dict[str, Callable[[], object]], *,
                flops: float = 0.0, bytes_moved: float = 0.0, dtype: torch.dtype = torch.bfloat16,
                memory: bool = False, notes: str = "", warmup: int = 5, reps: int = 30) -> CaseResult:
        """Time every variant (the one named "fused" first) and record ratios and the floor."""
        if FUSED not in variants:
            raise ValueError(f"compare({name!r}): variants must include {FUSED!r}, got {sorted(variants)}")
        ms = {key: cuda_time_ms(fn, warmup=warmup, reps=reps) for key, fn in variants.items()}
        result = CaseResult(name=name, params=params, ms=ms, notes=notes,
                            speedup={k: ms[k] / ms[FUSED] for k in ms if k != FUSED})
        if flops or bytes_moved:
            result.floor_ms = floor_ms(flops, bytes_moved, dtype)
            result.fraction_of_floor = result.floor_ms / ms[FUSED]
        if memory:
            result.peak_mb = {key: peak_memory_mb(fn) for key, fn in variants.items()}
        self.cases.append(result)
        return result

    def environment(self) -> dict:
        props = torch.cuda.get_device_properties(0)
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        from nitrokernels import _ext
        return {
            "gpu": props.name, "gpu_memory_GiB": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "extension": _ext.extension_status(), "python": platform.python_version(),
            "commit": _git_commit(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "roofline": device_roofline(),
        }

    def write(self, directory: str = RESULTS_DIR) -> str | None:
        if not self.cases:
            return None
        env = self.environment()
        os.makedirs(directory, exist_ok=True)
        gpu = "".join(c if c.isalnum() else "-" for c in env["gpu"]).strip("-").lower()
        path = os.path.join(directory, f"{gpu}-{datetime.date.today().isoformat()}.json")
        with open(path, "w") as f:
            json.dump({"environment": env, "cases": [asdict(c) for c in self.cases]}, f, indent=2)
        return path


def _git_commit() -> str | None:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__),
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None
