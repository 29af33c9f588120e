"""Shared correctness helpers for tests (ours and yours): references, tolerances, poisoned outputs.

The rule (as in flash-attention's tests): a low-precision kernel passes when its error against a float64
reference is at most `factor` (2) times the error of eager PyTorch run in the same low precision, plus a
small absolute floor. Float32 and float64 paths are compared directly at a tight tolerance.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import torch

# Tight tolerances for full-precision paths (relative to the reference's scale).
FULL_PRECISION_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def to_reference(x):
    """Detached float64 copies (recursively) of tensors, for the reference computation."""
    if isinstance(x, torch.Tensor):
        y = x.detach().to(torch.float64) if x.is_floating_point() else x.detach().clone()
        return y.requires_grad_(x.requires_grad)
    if isinstance(x, (list, tuple)):
        return type(x)(to_reference(v) for v in x)
    if isinstance(x, dict):
        return {k: to_reference(v) for k, v in x.items()}
    return x


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a kernel's output buffer with NaN (or the integer max) so unwritten elements fail the check."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


def poisoned_empty(*shape, dtype=torch.float32, device="cpu", memory_format=torch.contiguous_format):
    return poison_(torch.empty(*shape, dtype=dtype, device=device, memory_format=memory_format))


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs().max().item()


def assert_close_to_reference(actual: torch.Tensor, reference: torch.Tensor, eager_same_dtype: torch.Tensor | None = None,
                              *, factor: float = 2.0, atol: float | None = None, name: str = "output"):
    """Check `actual` against a float64 `reference`.

    Low precision (fp16/bf16): error(actual) <= factor * error(eager_same_dtype) + atol.
    Full precision: |actual - reference| <= rtol * max|reference| + atol.
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    if not torch.isfinite(actual).all():
        bad = (~torch.isfinite(actual)).sum().item()
        raise AssertionError(f"{name}: {bad} non-finite values (unwritten output or overflow)")
    err = max_error(actual, reference)
    scale = reference.detach().abs().max().item() or 1.0
    if actual.dtype in FULL_PRECISION_RTOL:
        bound = FULL_PRECISION_RTOL[actual.dtype] * scale + (atol or 0.0)
        rule = f"rtol {FULL_PRECISION_RTOL[actual.dtype]:g} of max|ref| {scale:.3g}"
    else:
        if eager_same_dtype is None:
            raise ValueError(f"{name}: low-precision check needs the eager result in {actual.dtype}")
        eager_err = max_error(eager_same_dtype, reference)
        floor = atol if atol is not None else 1e-3 * scale
        bound = factor * eager_err + floor
        rule = f"{factor}x eager {actual.dtype} error {eager_err:.3g} + floor {floor:.3g}"
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.4g} exceeds {bound:.4g} ({rule})")


def grads_of(outputs: torch.Tensor, inputs: Sequence[torch.Tensor], grad_output: torch.Tensor):
    """Gradients of `outputs` w.r.t. `inputs` (None kept for inputs that get no gradient)."""
    return torch.autograd.grad(outputs, list(inputs), grad_output.to(outputs.dtype), allow_unused=True)


def random_tensor(shape, *, dtype=torch.float32, device="cpu", channels_last=False, generator=None,
                  requires_grad=False, scale=1.0, offset=0.0) -> torch.Tensor:
    """Random normal data (never zeros), optionally in channels_last memory layout."""
    x = torch.randn(shape, dtype=torch.float32, device="cpu", generator=generator) * scale + offset
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.requires_grad_(requires_grad)


def odd_sizes(rng: random.Random, low: int, high: int, count: int) -> list[int]:
    """Sizes in [low, high] that avoid powers of two and multiples of 16 where the range allows."""
    pool = [n for n in range(low, high + 1) if n % 16 and (n & (n - 1))] or list(range(low, high + 1))
    return [rng.choice(pool) for _ in range(count)]


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as `x` in a non-contiguous view (every other element of a doubled last dim)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    view = wide[..., ::2]
    view.copy_(x.detach())
    return view.requires_grad_(x.requires_grad)


def run_backends(fn: Callable, backends: Sequence[str], *args, **kwargs):
    """Run `fn(*args, **kwargs)` with each backend forced; returns {backend: result}."""
    from nitrokernels.ops.dispatch import use_backend

    results = {}
    for backend in backends:
        with use_backend(backend):
            results[backend] = fn(*args, **kwargs)
    return results


def assert_graph_capturable(step: Callable[[], Sequence]) -> None:
    """CUDA only: `step()` (returning tensors, None entries allowed, sparse ones compared densely) runs
    without a host sync once warmed up, and a CUDA-graph capture of it replays to the eager results."""
    def dense(t):
        return t.to_dense() if t.is_sparse else t

    expected = step()                       # compiles kernels, fills caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side = torch.cuda.Stream()              # warm-up on a side stream, as torch.cuda.graphs recommends
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    graph.replay()
    torch.cuda.synchronize()
    for e, g in zip(expected, static):
        if e is not None:
            torch.testing.assert_close(dense(g), dense(e))
