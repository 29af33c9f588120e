"""Scaled dot-product attention: our Triton flash attention, or PyTorch SDPA (xformers when installed).

    out = nitrokernels.ops.attention(q, k, v, scale=None, attn_mask=None, dropout_p=0.0, is_causal=False)

Same contract as `F.scaled_dot_product_attention` for 4-D inputs: q [B, H, Lq, D], k [B, H, Lk, D],
v [B, H, Lk, Dv]; any strides. Backends (dispatch.BACKENDS order):
  * "triton": `torch.ops.nitrokernels.flash_attn_fwd` / `flash_attn_bwd` (custom ops with register_fake and
    register_autograd; torch.compile sees one opaque node, no graph break). It refuses, with the reason:
    attention masks, dropout_p > 0, is_causal, Dv != D, head dims > 128, fp32 on a GPU (the kernel is for
    fp16/bf16 tensor cores; fp32 runs only under TRITON_INTERPRET=1), empty sequences.
  * "eager": xformers' memory_efficient_attention when installed and the inputs suit it (CUDA, fp16/bf16,
    no mask, not compiling), else `F.scaled_dot_product_attention` (PyTorch picks its flash / memory-efficient
    / cuDNN / math kernel). Its own autograd.
When the Triton kernel is not used (and no backend was forced) the reason is counted in
`attention_fallbacks()` and logged once at INFO on the "nitrokernels" logger.

Under torch.compile the backend is chosen at trace time from the inputs' static properties and the forcing
in effect then (the dispatcher's context variables cannot be traced, so they are read as trace constants).
"""
from __future__ import annotations

import collections
import importlib.util
import logging
import math
import os

import torch
import torch.nn.functional as F

from nitrokernels.ops.dispatch import dispatched_op

log = logging.getLogger("nitrokernels")

ATTENTION = dispatched_op(
    "attention", "scaled dot-product attention: Triton flash attention (fwd+bwd) or SDPA / xformers")
MAX_HEAD_DIM = 128
_LOW_PRECISION = (torch.float16, torch.bfloat16)

_fallbacks: collections.Counter[str] = collections.Counter()


# =============================================================================================== custom ops
def _empty_like_layout(ref: torch.Tensor, length: int, dim: int, dtype=None) -> torch.Tensor:
    # Mirrors nitrokernels.kernels.attention.empty_like_layout (kept here so fake tensors need no Triton).
    b, h = ref.shape[0], ref.shape[1]
    dtype = dtype or ref.dtype
    if ref.stride(1) < ref.stride(2):
        return torch.empty(b, length, h, dim, dtype=dtype, device=ref.device).transpose(1, 2)
    return torch.empty(b, h, length, dim, dtype=dtype, device=ref.device)


@torch.library.custom_op("nitrokernels::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton flash attention forward: (out laid out like q, lse2 [B, H, Lq] fp32, base-2)."""
    from nitrokernels.kernels.attention import flash_attn_forward

    return flash_attn_forward(q, k, v, scale)


@flash_attn_fwd.register_fake
def _(q, k, v, scale):
    out = _empty_like_layout(q, q.shape[2], q.shape[3])
    lse = q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("nitrokernels::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton flash attention backward: dq, dk, dv laid out like q, k, v."""
    from nitrokernels.kernels.attention import flash_attn_backward

    return flash_attn_backward(grad_out, q, k, v, out, lse, scale)


@flash_attn_bwd.register_fake
def _(grad_out, q, k, v, out, lse, scale):
    return (_empty_like_layout(q, q.shape[2], q.shape[3]), _empty_like_layout(k, k.shape[2], k.shape[3]),
            _empty_like_layout(v, v.shape[2], v.shape[3]))


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.nitrokernels.flash_attn_bwd(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


flash_attn_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ================================================================================================ checks
def _validate(q, k, v, scale, attn_mask, dropout_p, is_causal):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [batch, heads, length, head_dim], got shape "
                             f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0] or q.shape[1] != k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(f"attention: batch and heads must match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q and k head dims differ: {q.shape[3]} vs {k.shape[3]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"attention: k and v lengths differ: {k.shape[2]} vs {v.shape[2]}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and math.isfinite(scale)):
        raise ValueError(f"attention: scale must be a finite number or None, got {scale!r}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attention: attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise TypeError(f"attention: attn_mask must be bool or {q.dtype} (the query dtype), got {attn_mask.dtype}")
        if is_causal:
            raise ValueError("attention: pass either attn_mask or is_causal=True, not both")
        if attn_mask.device != q.device:
            raise ValueError(f"attention: attn_mask is on {attn_mask.device}, q on {q.device}")
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if attn_mask.dim() > 4 or any(m not in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target))):
            raise ValueError(f"attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"[batch, heads, q_len, k_len] = {list(target)}")


def _triton_reasons(q, k, v, *, scale=None, attn_mask=None, dropout_p=0.0, is_causal=False) -> list[str]:
    reasons = []
    if attn_mask is not None:
        reasons.append("attention masks are not supported by the Triton kernel")
    if dropout_p > 0.0:
        reasons.append("dropout_p > 0 is not supported by the Triton kernel")
    if is_causal:
        reasons.append("is_causal is not supported by the Triton kernel")
    if v.shape[-1] != q.shape[-1]:
        reasons.append("value head dim differs from the query head dim")
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim > {MAX_HEAD_DIM}")
    if q.dtype not in _LOW_PRECISION:
        if not (q.dtype == torch.float32 and q.device.type == "cpu"):
            reasons.append(f"dtype {q.dtype}: the Triton kernel runs fp16/bf16 (fp32 only under the interpreter)")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        reasons.append("bf16 under Triton's CPU interpreter (its tl.dot mishandles bfloat16)")
    if q.shape[2] == 0 or k.shape[2] == 0:
        reasons.append("empty sequence")
    return reasons


def _xformers_installed() -> bool:
    if os.environ.get("NITROKERNELS_DISABLE_XFORMERS", "0") not in ("", "0"):
        return False
    return importlib.util.find_spec("xformers") is not None


# ============================================================================================= backends
@ATTENTION.register("triton", check=_triton_reasons)
def _attention_triton(q, k, v, *, scale=None, attn_mask=None, dropout_p=0.0, is_causal=False):
    s = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.nitrokernels.flash_attn_fwd(q, k, v, s)[0]


def _xformers_reasons(q, attn_mask, dropout_p) -> list[str]:
    if not _xformers_installed():
        return ["xformers is not installed"]
    reasons = []
    if q.device.type != "cuda":
        reasons.append("xformers needs CUDA tensors")
    if q.dtype not in _LOW_PRECISION:
        reasons.append("xformers path is used for fp16/bf16 only")
    if attn_mask is not None:
        reasons.append("masks go to SDPA")
    if torch.compiler.is_compiling():
        reasons.append("torch.compile traces SDPA instead")
    return reasons


@ATTENTION.register("eager")
def _attention_eager(q, k, v, *, scale=None, attn_mask=None, dropout_p=0.0, is_causal=False):
    if not is_causal and not _xformers_reasons(q, attn_mask, dropout_p):  # pragma: no cover - not installed here
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              p=dropout_p, scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale)


@ATTENTION.set_example
def _example(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(2, 10, 4096, 64, device=device, dtype=dtype)
    k = torch.randn(2, 10, 77, 64, device=device, dtype=dtype)
    return (q, k, k), {}


# ============================================================================================== public
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, like F.scaled_dot_product_attention (4-D inputs, any strides).

    scale defaults to 1/sqrt(head_dim). The output of the Triton backend is laid out like q (a transposed
    view of [B, Lq, H, D] memory when q is one), which makes the usual transpose(1, 2).reshape free.
    """
    _validate(q, k, v, scale, attn_mask, dropout_p, is_causal)
    kwargs = dict(scale=scale, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    if torch.compiler.is_compiling():
        return ATTENTION.select_traced(q, k, v, **kwargs).fn(q, k, v, **kwargs)
    impl = ATTENTION.select(q, k, v, **kwargs)
    if impl.backend != "triton" and ATTENTION.forced_backend() is None:
        _record_fallback(ATTENTION.impls["triton"].reasons((q, k, v), kwargs))
    return impl.fn(q, k, v, **kwargs)


def _record_fallback(reasons: list[str]):
    key = "; ".join(reasons) or "unknown"
    if key not in _fallbacks:
        log.info("attention: Triton flash attention not used (%s); running SDPA", key)
    _fallbacks[key] += 1


def attention_fallbacks() -> dict[str, int]:
    """How often, and why, `attention` did not use the Triton kernel (unforced calls since the last reset)."""
    return dict(_fallbacks)


def reset_attention_fallbacks() -> None:
    """Forget the fallbacks counted so far (`attention_fallbacks()` is {} afterwards; each reason logs again)."""
    _fallbacks.clear()


def explain_attention(q, k, v, **kwargs) -> dict[str, list[str]]:
    """Per backend, why it cannot run these inputs ([] = it can)."""
    return ATTENTION.explain(q, k, v, **kwargs)


def xformers_status() -> str:
    """Whether the xformers path can be used at all (it is tried inside the eager backend)."""
    return "available" if _xformers_installed() else "not used: xformers is not installed"
