"""GEGLU (diffusers' feed-forward input layer): out = hidden * gelu(gate), hidden, gate = (x W^T + b).chunk(2, -1).

    out = nitrokernels.ops.geglu(x, weight, bias)      # x [..., K], weight [2N, K], bias [2N] or None -> [..., N]

Backends:
  * "triton": `torch.ops.nitrokernels.geglu_fwd` -- one GEMM with the gate*GELU epilogue, writing only
    [M, N]; when a gradient is needed it also writes the pre-activation (stored, not recomputed), and the
    backward is `torch.ops.nitrokernels.geglu_bwd_act` (fused activation gradient) + three cuBLAS GEMMs.
    Refuses, with the reason: dtype mismatch between x / weight / bias, fp32 on a GPU (the kernel is for fp16/bf16 tensor cores; fp32 only under TRITON_INTERPRET=1).
  * "eager": F.linear + chunk + F.gelu + multiply (what diffusers runs).
Under autocast, x / weight / bias are cast to the autocast dtype first (as autocast does for F.linear), so
fp32 master weights still run the fused kernel. Under torch.compile the backend is chosen at trace time (DispatchedOp.select_traced); the custom ops are opaque
nodes with fake implementations, so there is no graph break.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nitrokernels.ops.dispatch import dispatched_op

GEGLU = dispatched_op("geglu", "diffusers GEGLU: projection GEMM with the hidden * gelu(gate) epilogue")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# =============================================================================================== custom ops
@torch.library.custom_op("nitrokernels::geglu_fwd", mutates_args=())
def geglu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, save_proj: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (out [M, N], proj [M, 2N] when save_proj else an empty tensor)."""
    from nitrokernels.kernels.geglu import geglu_forward

    return geglu_forward(x, weight, bias, save_proj)


@geglu_fwd.register_fake
def _(x, weight, bias, save_proj):
    n = weight.shape[0] // 2
    out = x.new_empty(x.shape[0], n)
    pre = x.new_empty(x.shape[0], 2 * n) if save_proj else x.new_empty(0)
    return out, pre


@torch.library.custom_op("nitrokernels::geglu_bwd_act", mutates_args=())
def geglu_bwd_act(grad_out: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Gradient of the projection output [M, 2N] from grad_out [M, N] and the saved projection."""
    from nitrokernels.kernels.geglu import geglu_backward_act

    return geglu_backward_act(grad_out, proj)


@geglu_bwd_act.register_fake
def _(grad_out, proj):
    return proj.new_empty(proj.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, save_proj = inputs
    _, pre = output
    ctx.has_bias = bias is not None
    ctx.saved = save_proj
    ctx.save_for_backward(x, weight, pre)
    ctx.mark_non_differentiable(pre)


def _backward(ctx, grad_out, _grad_pre):
    x, weight, pre = ctx.saved_tensors
    if not ctx.saved:
        raise RuntimeError("nitrokernels.ops.geglu: the forward ran without saving the projection (no gradient "
                           "was needed then), so it cannot be differentiated")
    dpre = torch.ops.nitrokernels.geglu_bwd_act(grad_out, pre)
    dx = dpre @ weight if ctx.needs_input_grad[0] else None
    dw = dpre.t() @ x if ctx.needs_input_grad[1] else None
    db = dpre.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db, None


geglu_fwd.register_autograd(_backward, setup_context=_setup_context)


# ================================================================================================ checks
def _validate(x, weight, bias):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("geglu: x and weight must be Tensors")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"geglu: bias must be a Tensor or None, got {type(bias).__name__}")
    if x.dim() < 1:
        raise ValueError("geglu: x must have at least one dimension (the features)")
    if weight.dim() != 2:
        raise ValueError(f"geglu: weight must be 2-D [2*dim_out, dim_in], got shape {tuple(weight.shape)}")
    if weight.shape[0] % 2:
        raise ValueError(f"geglu: weight has {weight.shape[0]} output rows; GEGLU needs an even number "
                         "(hidden and gate halves)")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"geglu: x has {x.shape[-1]} features but weight expects {weight.shape[1]}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"geglu: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    devices = {x.device, weight.device} | ({bias.device} if bias is not None else set())
    if len(devices) > 1:
        raise ValueError(f"geglu: x, weight and bias must be on one device, got {sorted(map(str, devices))}")


def _triton_reasons(x, weight, bias=None) -> list[str]:
    reasons = []
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        reasons.append(f"dtypes differ (x {x.dtype}, weight {weight.dtype}"
                       + (f", bias {bias.dtype}" if bias is not None else "") + ")")
    if x.dtype not in _LOW_PRECISION and not (x.dtype == torch.float32 and x.device.type == "cpu"):
        reasons.append(f"dtype {x.dtype}: the Triton kernel runs fp16/bf16 (fp32 only under the interpreter)")
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        reasons.append("bf16 under Triton's CPU interpreter (its tl.dot mishandles bfloat16)")
    if x.numel() == 0 or weight.numel() == 0:
        reasons.append("empty input")
    return reasons


# ============================================================================================= backends
@GEGLU.register("triton", check=_triton_reasons)
def _geglu_triton(x, weight, bias=None):
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    out, _ = torch.ops.nitrokernels.geglu_fwd(x2d, weight, bias, needs_grad)
    return out.view(*lead, weight.shape[0] // 2)


@GEGLU.register("eager")
def _geglu_eager(x, weight, bias=None):
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


@GEGLU.set_example
def _example(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(2, 1024, 1280, device=device, dtype=dtype)
    w = torch.randn(10240, 1280, device=device, dtype=dtype) * 0.02
    return (x, w, torch.zeros(10240, device=device, dtype=dtype)), {}


# ============================================================================================== public
def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """hidden * gelu(gate) with hidden, gate = (x @ weight^T + bias).chunk(2, -1) (exact erf GELU)."""
    _validate(x, weight, bias)
    device_type = x.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        # what autocast does for F.linear (a lower-precision op): cast x, weight and bias, then run without it
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _geglu_dispatch(x, weight, bias)
    _check_dtypes(x, weight, bias)
    return _geglu_dispatch(x, weight, bias)


def _check_dtypes(x, weight, bias):
    """Outside autocast x, weight and bias must share one floating dtype (as F.linear needs)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"geglu: {name} must be floating point, got {t.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"geglu: x, weight and bias must share a dtype (or run under torch.autocast), got x "
                        f"{x.dtype}, weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else ""))


def _geglu_dispatch(x, weight, bias):
    if torch.compiler.is_compiling():
        return GEGLU.select_traced(x, weight, bias).fn(x, weight, bias)
    return GEGLU(x, weight, bias)
