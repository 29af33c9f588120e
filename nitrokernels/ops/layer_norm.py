"""LayerNorm: `nitrokernels.ops.layer_norm(x, normalized_shape, weight, bias, eps)` runs torch's own kernel.

A standalone Triton LayerNorm was not made the default: torch's fused CUDA layer_norm (forward and backward)
is already a single memory-bound pass, a separate Triton kernel can at best tie it, and this library had no
GPU measurement showing a win. The op exists so callers (patch_unet, NitroAttnProcessor users) have one
name to use, and a faster backend can be registered here later without touching them. The real saving for
LayerNorm in the transformer blocks is fusing it into the next GEMM's prologue, which is not done yet.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nitrokernels.ops.dispatch import check_affine, dispatched_op

LAYER_NORM = dispatched_op("layer_norm", "LayerNorm over trailing dims (torch's fused kernel; no Triton backend)")


@LAYER_NORM.register("eager")
def _layer_norm_eager(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


@LAYER_NORM.set_example
def _example(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return (torch.randn(2, 4096, 640, device=device, dtype=dtype), (640,)), {}


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """F.layer_norm (torch's fused kernel on every device; see the module docstring for why)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"layer_norm: x must be a floating-point Tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    try:
        normalized_shape = tuple(int(s) for s in normalized_shape)
    except (TypeError, ValueError):
        raise TypeError(f"layer_norm: normalized_shape must be an int or a sequence of ints, got "
                        f"{normalized_shape!r}") from None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"layer_norm: eps must be a finite number >= 0, got {eps!r}")
    check_affine("layer_norm", weight, bias, normalized_shape, "normalized_shape")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {p.device} but x is on {x.device}")
    if tuple(x.shape[x.dim() - len(normalized_shape):]) != normalized_shape:
        raise ValueError(f"layer_norm: input of shape {tuple(x.shape)} does not end with normalized_shape "
                         f"{normalized_shape}")
    if torch.compiler.is_compiling():
        return _layer_norm_eager(x, normalized_shape, weight, bias, eps)
    return LAYER_NORM(x, normalized_shape, weight, bias, eps)
