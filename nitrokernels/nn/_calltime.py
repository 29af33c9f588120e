"""Call-time fallbacks of the fused modules: why a fused forward ran the original computation for a call.

A fused module checks, on every call, the few submodules and tensors its fast path bypasses (hooks, wrappers
such as PEFT's LoRA layers, accelerate / diffusers offload and casting hooks, meta or non-compute storage
dtypes). When the fast path cannot honour what it finds, it runs the original computation for that call and
records the reason here: `reasons(module)` -> {reason: calls}; `PatchHandle.fallbacks` / `summary()` read it.
The first occurrence of each (module, reason) is logged at INFO on the "nitrokernels" logger.

Nothing is recorded while torch.compile traces (the decision is made at trace time and compiled in; a
recompile follows when the checked attributes change, as dynamo guards on them).
"""
from __future__ import annotations

import logging
import weakref

import torch

log = logging.getLogger("nitrokernels")

_EVENTS: "weakref.WeakKeyDictionary[object, dict[str, int]]" = weakref.WeakKeyDictionary()


def record(module, what: str, reason: str) -> None:
    """Count one call of `module` (a fused block) that fell back, and why."""
    if torch.compiler.is_compiling():
        return
    events = _EVENTS.get(module)
    if events is None:
        events = _EVENTS[module] = {}
    if reason not in events:
        events[reason] = 0
        log.info("nitrokernels: fused %s (%s) ran the original computation: %s", what, type(module).__name__, reason)
    events[reason] += 1


def reasons(module) -> dict[str, int]:
    """{reason: number of calls} recorded for `module` (empty when it always took its fused path)."""
    return dict(_EVENTS.get(module, {}))


def clear() -> None:
    _EVENTS.clear()


def linear_bypass_reason(linear, x: torch.Tensor | None, name: str) -> str | None:
    """Why a fused path must not read `linear.weight` / `.bias` directly instead of calling `linear`, or None."""
    from torch import nn

    if type(linear) is not nn.Linear:
        kind = type(linear)
        return f"{name} is {kind.__module__}.{kind.__qualname__} (a wrapper such as a LoRA layer), not nn.Linear"
    if linear._forward_hooks or linear._forward_pre_hooks or linear._backward_hooks or \
            getattr(linear, "_backward_pre_hooks", None):
        return f"hooks on {name}"
    if "forward" in linear.__dict__:
        return (f"{name}.forward was replaced on the instance (accelerate / diffusers hooks: offloading, "
                f"layerwise casting)")
    return tensors_bypass_reason((linear.weight, linear.bias), x, name)


def tensors_bypass_reason(tensors, x: torch.Tensor | None, name: str) -> str | None:
    """Why parameters `tensors` cannot be fed to a fused kernel together with input `x`, or None."""
    autocast = x is not None and torch.is_autocast_enabled(x.device.type)
    for t in tensors:
        if t is None:
            continue
        if type(t) not in (torch.Tensor, nn_parameter()):
            return f"{name} holds a {type(t).__name__} (tensor subclass)"
        if t.device.type == "meta":
            return f"{name} has parameters on the meta device (offloaded)"
        if x is None:
            continue
        if t.device != x.device:
            return f"{name} has parameters on {t.device}, the input is on {x.device}"
        if autocast:
            if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return f"{name} stores {t.dtype} (not a compute dtype)"
        elif t.dtype != x.dtype:
            return f"{name} stores {t.dtype}, the input is {x.dtype}"
    return None


def nn_parameter():
    return torch.nn.Parameter
