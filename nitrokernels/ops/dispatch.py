"""Backend dispatch: every op lists its implementations and picks the fastest one that applies.

An op is a `DispatchedOp`. Each backend registers an implementation with a `check(*args, **kwargs)` that
returns the reasons it cannot run those inputs (an empty list means it can). Backends are tried in the
order of `BACKENDS` (CUDA extension, then Triton, then the eager reference). Generic conditions (extension
built? Triton importable? tensors on a GPU or Triton's interpreter on?) are checked here once; the op's
own check adds shape / dtype / layout limits.

Forcing a backend (tests, benchmarks, debugging):
  * environment: NITROKERNELS_BACKEND=eager            every op
                 NITROKERNELS_BACKEND=group_norm_silu=triton,head_conv=eager   per op
  * code:        with nitrokernels.use_backend("triton"): ...            every op
                 with nitrokernels.use_backend("eager", "group_norm_silu"): ...
A forced backend that cannot run the inputs raises `BackendUnavailable` with its reasons: forcing is
a request to test that path, so silently running another one would hide a bug.
Why a backend was skipped is logged at DEBUG on the "nitrokernels" logger and shown by `nitrokernels info`.
"""
from __future__ import annotations

import contextlib
import functools
import contextvars
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple

import torch

from nitrokernels import _ext
from nitrokernels.kernels.plan import triton_interpreting  # noqa: F401  (re-exported: ops read it from here)

log = logging.getLogger("nitrokernels")

BACKENDS = ("cuda_ext", "triton", "eager")
_forced: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("nitrokernels_forced", default={})
_ALL = "*"


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given inputs."""


# ----------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    # Cached: find_spec walks sys.path, too slow for a check that runs on every op call. A finder that refuses
    # the module (import hooks, a broken install) means "not importable", not a crash of every op.
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def tensors_in(args: Iterable, kwargs: dict) -> list[torch.Tensor]:
    """Tensors among the arguments, looking one level into lists and tuples (e.g. feature lists)."""
    found = []
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


class Facts(NamedTuple):
    """What the generic checks read from the process (not from the inputs)."""
    extension: bool
    extension_status: str
    triton: bool
    interpreting: bool


def live_facts() -> Facts:
    return Facts(_ext.extension_available(), _ext.extension_status(), triton_importable(), triton_interpreting())


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result without importing torch._dynamo when nitrokernels is imported
    (that import alone takes ~2 s); tests/test_attention.py and test_geglu.py compile through it."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _trace_constants(op_name: str) -> tuple[str, Facts]:
    """The forced backend of `op_name` and the process facts, read once per torch.compile trace: dynamo
    cannot trace the forcing ContextVar or the environment reads, and neither changes within a trace."""
    return REGISTRY[op_name].forced_backend() or "", live_facts()


def _generic_reasons(backend: str, tensors: list[torch.Tensor], facts: Facts) -> list[str]:
    devices = {t.device.type for t in tensors}
    if backend == "cuda_ext":
        if not facts.extension:
            return [f"CUDA extension {facts.extension_status}"]
        if devices != {"cuda"}:
            return [f"CUDA extension needs CUDA tensors, got {sorted(devices)}"]
    elif backend == "triton":
        if not facts.triton:
            return ["triton is not installed"]
        if devices and devices != {"cuda"} and not (devices == {"cpu"} and facts.interpreting):
            return [f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {sorted(devices)}"]
    return []


# -------------------------------------------------------------------------------------------------- op
@dataclass
class Implementation:
    backend: str
    fn: Callable
    check: Callable[..., list[str]] | None = None

    def reasons(self, args, kwargs, facts: Facts | None = None) -> list[str]:
        generic = _generic_reasons(self.backend, tensors_in(args, kwargs), facts or live_facts())
        if generic:
            return generic
        return list(self.check(*args, **kwargs)) if self.check else []


@dataclass
class DispatchedOp:
    """One operation with several implementations; calling it runs the preferred one that applies."""

    name: str
    doc: str = ""
    impls: dict[str, Implementation] = field(default_factory=dict)
    example: Callable[[torch.device], tuple[tuple, dict]] | None = None

    def register(self, backend: str, check: Callable[..., list[str]] | None = None):
        """Decorator: `@op.register("triton", check=fn)` adds an implementation."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

        def decorate(fn):
            self.impls[backend] = Implementation(backend, fn, check)
            return fn

        return decorate

    def set_example(self, factory: Callable[[torch.device], tuple[tuple, dict]]):
        """Register a factory of typical inputs so `nitrokernels info` can show what would run."""
        self.example = factory
        return factory

    def forced_backend(self) -> str | None:
        forced = _forced.get()
        return forced.get(self.name) or forced.get(_ALL) or _env_forced().get(self.name) or _env_forced().get(_ALL)

    def explain(self, *args, **kwargs) -> dict[str, list[str]]:
        """Per backend, the reasons it cannot run these inputs ([] = it can)."""
        return {b: (self.impls[b].reasons(args, kwargs) if b in self.impls else ["not implemented for this op"])
                for b in BACKENDS}

    def select(self, *args, **kwargs) -> Implementation:
        return self._select(self.forced_backend(), live_facts(), args, kwargs, log_skips=True)

    def select_traced(self, *args, **kwargs) -> Implementation:
        """`select` for use inside torch.compile'd code: same rule, with the forced backend and the process
        facts taken as trace-time constants (a change of either needs a recompile, like any constant)."""
        forced, facts = _trace_constants(self.name)
        return self._select(forced or None, facts, args, kwargs, log_skips=False)  # no logging calls in a trace

    def _select(self, forced: str | None, facts: Facts, args, kwargs, log_skips: bool) -> Implementation:
        if forced is not None:
            return self._forced_impl(forced, args, kwargs, facts)
        skipped = []
        for backend in BACKENDS:
            impl = self.impls.get(backend)
            if impl is None:
                continue
            reasons = impl.reasons(args, kwargs, facts)
            if not reasons:
                if skipped and log_skips and log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: using %s; skipped %s", self.name, backend, "; ".join(skipped))
                return impl
            skipped.append(f"{backend} ({', '.join(reasons)})")
        raise BackendUnavailable(f"{self.name}: no backend can run these inputs: {'; '.join(skipped)}")

    def _forced_impl(self, backend: str, args, kwargs, facts: Facts) -> Implementation:
        impl = self.impls.get(backend)
        if impl is None:
            raise BackendUnavailable(f"{self.name}: backend {backend!r} was forced but this op has no such "
                                     f"implementation (it has {sorted(self.impls)})")
        reasons = impl.reasons(args, kwargs, facts)
        if reasons:
            raise BackendUnavailable(f"{self.name}: backend {backend!r} was forced but cannot run these inputs: "
                                     + "; ".join(reasons))
        return impl

    def __call__(self, *args, **kwargs):
        return self.select(*args, **kwargs).fn(*args, **kwargs)


REGISTRY: dict[str, DispatchedOp] = {}


def dispatched_op(name: str, doc: str = "") -> DispatchedOp:
    """Create (once) and return the op called `name`."""
    if name not in REGISTRY:
        REGISTRY[name] = DispatchedOp(name, doc)
    return REGISTRY[name]


# ------------------------------------------------------------------------------------------- forcing
def _parse_forcing(spec: str) -> dict[str, str]:
    forced = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, _, backend = item.rpartition("=")
        backend = backend.strip()
        if backend not in BACKENDS:
            raise ValueError(f"NITROKERNELS_BACKEND: unknown backend {backend!r} in {spec!r}; use one of {BACKENDS}")
        forced[op.strip() or _ALL] = backend
    return forced


_env_cache: dict[str, dict[str, str]] = {}


def _env_forced() -> dict[str, str]:
    spec = os.environ.get("NITROKERNELS_BACKEND", "")
    if spec not in _env_cache:
        _env_cache[spec] = _parse_forcing(spec)
    return _env_cache[spec]


@contextlib.contextmanager
def use_backend(backend: str, *ops: str) -> Iterator[None]:
    """Force `backend` for the given ops (all ops when none are named) inside the `with` block."""
    if backend not in BACKENDS:
        raise ValueError(f"use_backend: backend must be one of {BACKENDS}, got {backend!r}")
    unknown = [op for op in ops if op not in REGISTRY]
    if unknown:
        raise ValueError(f"use_backend: unknown op(s) {unknown}; known: {sorted(REGISTRY)}")
    update = {op: backend for op in ops} if ops else {_ALL: backend}
    current = dict(_forced.get())
    if not ops:  # a global force overrides earlier per-op forcing too
        current = {}
    token = _forced.set({**current, **update})
    try:
        yield
    finally:
        _forced.reset(token)


def check_affine(op: str, weight, bias, shape: tuple, shape_name: str) -> None:
    """The optional affine weight / bias of a normalisation op: Tensors (or None) of `shape` (called
    `shape_name` in the message); the device is checked with the input's by the op."""
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(p).__name__}")
        if tuple(p.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must have shape {tuple(shape)} ({shape_name}), got {tuple(p.shape)}")
