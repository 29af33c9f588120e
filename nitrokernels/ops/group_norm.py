"""Fused GroupNorm (+ time-embedding add) (+ SiLU): the `h + temb -> norm -> SiLU` sequence of diffusers' ResnetBlock2D.

    out = nitrokernels.ops.group_norm_silu(x, num_groups, weight, bias, eps, temb=temb, act="silu")
        == F.silu(F.group_norm(x + temb[:, :, None, None], num_groups, weight, bias, eps))

x is (N, C, *spatial) with any number of spatial dims (including none), float16 / bfloat16 / float32 (float64 runs
the eager backend); statistics are always float32. temb is (N, C) (or (N, C, 1, 1, ...), or (1, C) broadcast over
the batch). weight / bias / temb have x's dtype or float32 (mixed precision: fp32 norm parameters with half
activations). act is "silu" (alias "swish") or None. Gradients flow to x, weight, bias and temb.

Layouts: contiguous NCHW and channels_last (NHWC, channels_last_3d, or (N, L, C)-strided 3-D) run natively, without
a layout copy; the output has the input's layout. Any other strides are made contiguous first.

Backends (nitrokernels.ops.dispatch; force with NITROKERNELS_BACKEND=group_norm_silu=<backend> or
`use_backend(<backend>, "group_norm_silu")`, which forces forward and backward alike):
  * "cuda_ext": csrc/group_norm/group_norm_silu.cu (torch.ops.nitrokernels_cuda.group_norm_silu_fwd / _bwd):
    16-byte vector loads, each (sample, group) split over many blocks (per-channel partial statistics, then a
    small merge kernel, then the normalise+SiLU pass), NCHW and NHWC kernels of their own.
  * "triton": nitrokernels/kernels/group_norm.py, the same three-pass structure with one stride-generic set of
    kernels for both layouts; runs on CPU tensors under TRITON_INTERPRET=1 (tests).
  * "eager": ops/reference.py's `group_norm_silu_reference` (the definition) forward; a closed-form backward in
    plain tensor ops (no autograd inside, so it runs under torch.compile and dispatch modes such as
    FlopCounterMode).

How the dispatcher chooses (first backend without a reason wins, in the order cuda_ext -> triton -> eager):
  * cuda_ext takes every input whose layout lets it use its 16-byte vector path: NCHW with the spatial size a
    multiple of 16 bytes of elements (HW % 8 for half, HW % 4 for float), channels_last with C a multiple of it,
    16-byte-aligned pointers. That covers every SDXL / VAE shape. Other shapes would drop it to its scalar loop
    (one element per load), so automatic dispatch hands them to Triton, whose masked tiles stay wide whatever
    the size; forcing "cuda_ext" still runs the scalar path (that is how it is tested). This split is a design
    expectation: benchmarks/bench_group_norm.py times both backends side by side at the SDXL shapes, and the
    rule should follow what it measures.
  * triton takes the rest (float16 / bfloat16 / float32, < 2**31 elements per sample).
  * eager takes anything (float64, CPU tensors without the Triton interpreter).

Entry points: in eager mode the op runs through a torch.autograd.Function (a torch.library custom op costs ~4x
more Python per call, which matters at the 10-50 us these kernels take); under torch.compile, tracing, fake
tensors or tensor subclasses it goes through the registered custom ops `nitrokernels::group_norm_silu` (fake
implementation + registered autograd) so compiled graphs keep it as one opaque node without graph breaks.
Both entry points run the same implementations.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from nitrokernels.ops.dispatch import check_affine, dispatched_op, triton_interpreting
from nitrokernels.ops.reference import group_norm_silu_reference

__all__ = ["group_norm_silu", "GROUP_NORM_SILU"]

GROUP_NORM_SILU = dispatched_op(
    "group_norm_silu", "GroupNorm (+ temb add) (+ SiLU) forward and backward, fp32 statistics, NCHW / channels_last")

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALL_DTYPES = _KERNEL_DTYPES + (torch.float64,)
_ACTS = {"silu": True, "swish": True, None: False}
_INT32_MAX = 2**31 - 1


# ============================================================================================== helpers
def _is_channels_last(x: torch.Tensor) -> bool:
    """True for a dense channels-last tensor that is not also contiguous (the kernels' NHWC case)."""
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _empty_like_layout(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor with x's shape and (dense) strides."""
    return torch.empty_strided(x.shape, x.stride(), dtype=dtype or x.dtype, device=x.device)


def _match_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` with exactly ref's strides (a copy unless it already has them)."""
    if t.stride() == ref.stride():
        return t
    out = _empty_like_layout(ref, t.dtype)
    out.copy_(t)
    return out


def _param_dtypes_ok(x: torch.Tensor, *params) -> bool:
    return all(p is None or p.dtype in (x.dtype, torch.float32) for p in params)


def _vector_width(dtype: torch.dtype) -> int:
    return 16 // torch.empty((), dtype=dtype).element_size()


# ============================================================================================== backends
class _Eager:
    """The reference: forward = ops.reference, backward = its closed form (statistics recomputed)."""

    @staticmethod
    def _compute_dtype(x, *params):
        if all(p is None or p.dtype == x.dtype for p in params):
            return x.dtype
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def __call__(self, x, weight, bias, temb, num_groups, eps, act):
        ct = self._compute_dtype(x, weight, bias, temb)
        cast = (lambda t: None if t is None else t.to(ct))
        out = group_norm_silu_reference(cast(x), num_groups, cast(weight), cast(bias), eps, cast(temb),
                                        "silu" if act else None)
        result = _empty_like_layout(x)
        result.copy_(out)
        n, c = x.shape[0], x.shape[1]
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = x.to(stat_dtype)
        if temb is not None:
            y = y + temb.to(stat_dtype).reshape(n, c, *([1] * (x.dim() - 2)))
        if y.numel() == 0:  # empty batch or empty spatial dims: no statistics to speak of
            zeros = x.new_zeros((n, num_groups), dtype=torch.float32)
            return result, zeros, zeros.clone()
        var, mean = torch.var_mean(y.reshape(n, num_groups, -1), dim=-1, unbiased=False)
        rstd = torch.rsqrt(var + eps)
        return result, mean.float(), rstd.float()

    def backward(self, dout, x, weight, bias, temb, mean, rstd, num_groups, eps, act):
        """Closed-form GroupNorm(+temb)(+SiLU) backward in plain tensor ops (float32, float64 for float64 inputs).

        No autograd inside: this runs inside a custom op's backward, where torch.compile (AOTAutograd) and
        FlopCounterMode / other dispatch modes see tensors that do not require grad -- re-running the forward
        under enable_grad() fails there ("element 0 of tensors does not require grad"). Statistics are
        recomputed here in the compute dtype (the saved fp32 ones would cost a float64 input its precision).
            z = xhat * w + b,  dz = dout * silu'(z),  dw = sum dz * xhat,  db = sum dz,
            dy = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)),  dxhat = dz * w,
            dx = dy,  dtemb = sum over space of dy.
        """
        if x.numel() == 0:  # sums over nothing are zero
            return (_empty_like_layout(x),) + tuple(None if t is None else torch.zeros_like(t)
                                                    for t in (weight, bias, temb))
        ct = torch.float64 if torch.float64 in (x.dtype, dout.dtype) else torch.float32
        n, c = x.shape[0], x.shape[1]
        y = x.to(ct).reshape(n, c, -1)
        if temb is not None:
            y = y + temb.to(ct).reshape(n, c, 1)
        yg = y.reshape(n, num_groups, -1)
        var, mu = torch.var_mean(yg, dim=-1, unbiased=False, keepdim=True)
        r = torch.rsqrt(var + eps)
        xhat = ((yg - mu) * r).reshape(n, c, -1)
        w = weight.to(ct).reshape(1, c, 1) if weight is not None else None
        dz = dout.to(ct).reshape(n, c, -1)
        if act:
            z = xhat * w if w is not None else xhat
            if bias is not None:
                z = z + bias.to(ct).reshape(1, c, 1)
            s = torch.sigmoid(z)
            dz = dz * (s * (1 + z * (1 - s)))
        dw = (dz * xhat).sum(dim=(0, 2)).to(weight.dtype) if weight is not None else None
        db = dz.sum(dim=(0, 2)).to(bias.dtype) if bias is not None else None
        dxhat = (dz * w if w is not None else dz).reshape(n, num_groups, -1)
        xhat = xhat.reshape(n, num_groups, -1)
        dy = r * (dxhat - dxhat.mean(dim=-1, keepdim=True) - xhat * (dxhat * xhat).mean(dim=-1, keepdim=True))
        dy = dy.reshape(n, c, -1)
        dt = dy.sum(dim=-1).to(temb.dtype) if temb is not None else None
        dx = _match_layout(dy.reshape(x.shape).to(x.dtype), x)
        return dx, dw, db, dt


class _Triton:
    def __call__(self, x, weight, bias, temb, num_groups, eps, act):
        from nitrokernels.kernels.group_norm import group_norm_forward

        out = _empty_like_layout(x)
        mean, rstd = group_norm_forward(x, num_groups, weight, bias, temb, eps, act, out)
        return out, mean, rstd

    def backward(self, dout, x, weight, bias, temb, mean, rstd, num_groups, eps, act):
        from nitrokernels.kernels.group_norm import group_norm_backward

        dx = _empty_like_layout(x)
        dw, db, dt = group_norm_backward(dout, x, num_groups, weight, bias, temb, mean, rstd, act, dx)
        return (dx, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None if dt is None else dt.to(temb.dtype))


class _CudaExt:
    def __call__(self, x, weight, bias, temb, num_groups, eps, act):
        out, mean, rstd = torch.ops.nitrokernels_cuda.group_norm_silu_fwd(x, weight, bias, temb, num_groups,
                                                                          float(eps), bool(act))
        return out, mean, rstd

    def backward(self, dout, x, weight, bias, temb, mean, rstd, num_groups, eps, act):
        dx, dw, db, dt = torch.ops.nitrokernels_cuda.group_norm_silu_bwd(dout, x, weight, bias, temb, mean, rstd,
                                                                         num_groups, bool(act))
        return (dx, dw if weight is not None else None, db if bias is not None else None,
                dt if temb is not None else None)


def _common_kernel_reasons(x, weight, bias, temb) -> list[str]:
    reasons = []
    if x.dtype not in _KERNEL_DTYPES:
        reasons.append(f"dtype {x.dtype} (kernels take float16 / bfloat16 / float32)")
    if not _param_dtypes_ok(x, weight, bias, temb):
        reasons.append("weight / bias / temb dtype is neither x's dtype nor float32")
    if x.numel() == 0:
        reasons.append("empty tensor (nothing to launch)")
    elif x.numel() // x.shape[0] > _INT32_MAX:
        reasons.append("more than 2**31 elements per sample")
    return reasons



def _cuda_ops_present() -> bool:
    try:
        torch.ops.nitrokernels_cuda.group_norm_silu_fwd  # noqa: B018
        torch.ops.nitrokernels_cuda.group_norm_silu_bwd  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _cuda_ext_reasons(x, weight, bias, temb, num_groups, eps, act) -> list[str]:
    reasons = _common_kernel_reasons(x, weight, bias, temb)
    if not _cuda_ops_present():
        reasons.append("the loaded extension has no group_norm_silu kernels (rebuild nitrokernels)")
    if reasons or GROUP_NORM_SILU.forced_backend() == "cuda_ext":
        return reasons  # forced: run whatever path the kernel has (the scalar one included)
    vec = _vector_width(x.dtype)
    inner = x.shape[1] if _is_channels_last(x) else x.numel() // max(x.shape[0] * x.shape[1], 1)
    if inner % vec or x.data_ptr() % 16:
        what = "C" if _is_channels_last(x) else "spatial size"
        reasons.append(f"{what} {inner} not a multiple of {vec} elements or unaligned data: the CUDA kernel would "
                       f"take its scalar path, Triton's masked tiles are preferred")
    return reasons


def _triton_reasons(x, weight, bias, temb, num_groups, eps, act) -> list[str]:
    return _common_kernel_reasons(x, weight, bias, temb)


GROUP_NORM_SILU.register("cuda_ext", check=_cuda_ext_reasons)(_CudaExt())
GROUP_NORM_SILU.register("triton", check=_triton_reasons)(_Triton())
GROUP_NORM_SILU.register("eager")(_Eager())


@GROUP_NORM_SILU.set_example
def _example(device: torch.device):
    """SDXL's largest GroupNorm (down block 0, 1024x1024 images, batch 2) in bf16 channels_last; small on CPU."""
    if device.type == "cuda":
        shape, dtype = (2, 320, 128, 128), torch.bfloat16
    else:
        shape, dtype = (1, 64, 16, 16), torch.float32
    x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    c = shape[1]
    w, b = torch.ones(c, device=device, dtype=dtype), torch.zeros(c, device=device, dtype=dtype)
    temb = torch.randn(shape[0], c, device=device, dtype=dtype)
    return (x, w, b, temb, 32, 1e-5, True), {}


_SELECTED: dict = {}


def _select(x, weight, bias, temb, num_groups, eps, act):
    """The implementation that runs these inputs; cached per (shape, dtypes, layout, alignment) when not forced."""
    if GROUP_NORM_SILU.forced_backend() is not None:
        return GROUP_NORM_SILU.select(x, weight, bias, temb, num_groups, eps, act)
    key = (x.device, x.device.type == "cpu" and triton_interpreting(), x.dtype, tuple(x.shape), x.stride(),
           x.data_ptr() % 16 == 0, num_groups, act,
           *(None if t is None else t.dtype for t in (weight, bias, temb)))
    impl = _SELECTED.get(key)
    if impl is None:
        if len(_SELECTED) > 4096:
            _SELECTED.clear()
        impl = _SELECTED[key] = GROUP_NORM_SILU.select(x, weight, bias, temb, num_groups, eps, act)
    return impl


def _dense(x: torch.Tensor) -> torch.Tensor:
    return x if (x.is_contiguous() or _is_channels_last(x)) else x.contiguous()


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _forward(x, weight, bias, temb, num_groups, eps, act):
    x, weight, bias, temb = _dense(x), _contig(weight), _contig(bias), _contig(temb)
    if temb is not None and tuple(temb.shape) != tuple(x.shape[:2]):
        raise ValueError(f"group_norm_silu: temb must be (N, C) = {tuple(x.shape[:2])}, got {tuple(temb.shape)}")
    impl = _select(x, weight, bias, temb, num_groups, eps, act)
    return impl.fn(x, weight, bias, temb, num_groups, eps, act)


def _backward(dout, x, weight, bias, temb, mean, rstd, num_groups, eps, act):
    x, weight, bias, temb = _dense(x), _contig(weight), _contig(bias), _contig(temb)
    dout = _match_layout(dout.to(x.dtype), x)
    impl = _select(x, weight, bias, temb, num_groups, eps, act)
    return impl.fn.backward(dout, x, weight, bias, temb, mean, rstd, num_groups, eps, act)


# ============================================================================================ custom ops
@torch.library.custom_op("nitrokernels::group_norm_silu", mutates_args=())
def group_norm_silu_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       temb: Optional[torch.Tensor], num_groups: int, eps: float, act: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out with x's layout, mean [N, G] fp32, rstd [N, G] fp32). temb must already be (N, C)."""
    return _forward(x, weight, bias, temb, num_groups, eps, act)


@group_norm_silu_op.register_fake
def _(x, weight, bias, temb, num_groups, eps, act):
    out = _empty_like_layout(_dense(x))
    stats = (x.shape[0], num_groups)
    return out, x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


@torch.library.custom_op("nitrokernels::group_norm_silu_backward", mutates_args=())
def group_norm_silu_backward_op(dout: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                bias: Optional[torch.Tensor], temb: Optional[torch.Tensor], mean: torch.Tensor,
                                rstd: torch.Tensor, num_groups: int, eps: float, act: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dweight, dbias, dtemb); an absent input's gradient is an empty tensor."""
    grads = _backward(dout, x, weight, bias, temb, mean, rstd, num_groups, eps, act)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@group_norm_silu_backward_op.register_fake
def _(dout, x, weight, bias, temb, mean, rstd, num_groups, eps, act):
    return (_empty_like_layout(_dense(x)),) + tuple(
        t.new_empty(t.shape) if t is not None else x.new_empty(0) for t in (weight, bias, temb))


def _setup_context(ctx, inputs, output):
    x, weight, bias, temb, num_groups, eps, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, temb, mean, rstd)
    ctx.cfg = (num_groups, eps, act)
    ctx.mark_non_differentiable(mean, rstd)


def _grads_for(ctx, grads, present):
    needs = ctx.needs_input_grad
    return tuple(g if (p and needs[i]) else None for i, (g, p) in enumerate(zip(grads, present))) + (None,) * 3


def _op_backward(ctx, dout, _dmean, _drstd):
    x, weight, bias, temb, mean, rstd = ctx.saved_tensors
    grads = torch.ops.nitrokernels.group_norm_silu_backward(dout, x, weight, bias, temb, mean, rstd, *ctx.cfg)
    return _grads_for(ctx, grads, (True, weight is not None, bias is not None, temb is not None))


group_norm_silu_op.register_autograd(_op_backward, setup_context=_setup_context)


class _GroupNormSiLUFunction(torch.autograd.Function):
    """The eager-mode entry: same implementations as the custom ops, without their per-call Python cost."""

    @staticmethod
    def forward(ctx, x, weight, bias, temb, num_groups, eps, act):
        out, mean, rstd = _forward(x, weight, bias, temb, num_groups, eps, act)
        ctx.save_for_backward(x, weight, bias, temb, mean, rstd)
        ctx.cfg = (num_groups, eps, act)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, weight, bias, temb, mean, rstd = ctx.saved_tensors
        grads = _backward(dout, x, weight, bias, temb, mean, rstd, *ctx.cfg)
        return _grads_for(ctx, grads, (True, weight is not None, bias is not None, temb is not None))


def _plain(t: torch.Tensor | None) -> bool:
    if t is None:
        return True
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _use_fast_path(*tensors) -> bool:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._is_torch_function_mode_enabled():
        return False
    return all(_plain(t) for t in tensors)


# ========================================================================================== public API
def _check_inputs(x, num_groups, weight, bias, temb, act) -> bool:
    """Validate; returns the activation flag. Errors name the argument and what was expected."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm_silu: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _ALL_DTYPES:
        raise TypeError(f"group_norm_silu: x has dtype {x.dtype}; expected one of float16, bfloat16, float32, float64")
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"group_norm_silu: num_groups must be a positive int, got {num_groups!r}")
    n, c = x.shape[0], x.shape[1]
    if c % num_groups != 0:
        raise ValueError(f"group_norm_silu: num_channels C={c} is not divisible by num_groups={num_groups}")
    if act not in _ACTS:
        raise ValueError(f"group_norm_silu: act must be 'silu' or None, got {act!r}")
    check_affine("group_norm_silu", weight, bias, (c,), f"(C,) for C={c}")
    if temb is not None:
        if not isinstance(temb, torch.Tensor):
            raise TypeError(f"group_norm_silu: temb must be a Tensor or None, got {type(temb).__name__}")
        shape = tuple(temb.shape)
        ok = (len(shape) == 2 or (len(shape) == x.dim() and all(s == 1 for s in shape[2:]))) \
            and len(shape) >= 2 and shape[0] in (1, n) and shape[1] == c
        if not ok:
            raise ValueError(f"group_norm_silu: temb must have shape (N, C) = ({n}, {c}) (or (N, C, 1, ...) / (1, C)),"
                             f" got {shape}")
    for name, p in (("weight", weight), ("bias", bias), ("temb", temb)):
        if p is None:
            continue
        if p.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"group_norm_silu: {name} has dtype {p.dtype} but x has {x.dtype}; {name} must match x "
                            f"or be float32")
        if p.device != x.device:
            raise ValueError(f"group_norm_silu: {name} is on {p.device} but x is on {x.device}")
    return _ACTS[act]


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5, *, temb: torch.Tensor | None = None,
                    act: str | None = "silu") -> torch.Tensor:
    """act(GroupNorm(x + temb[:, :, None, ...], num_groups, weight, bias, eps)); see the module docstring."""
    act_flag = _check_inputs(x, num_groups, weight, bias, temb, act)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"group_norm_silu: eps must be a finite number >= 0, got {eps!r}")
    if temb is not None:
        n, c = x.shape[0], x.shape[1]
        temb = temb.reshape(temb.shape[0], c)
        if temb.shape[0] != n:
            temb = temb.expand(n, c)
    if not (x.is_contiguous() or _is_channels_last(x)):
        x = x.contiguous()
    args = (x, weight, bias, temb, int(num_groups), float(eps), act_flag)
    if _use_fast_path(x, weight, bias, temb):
        return _GroupNormSiLUFunction.apply(*args)
    return torch.ops.nitrokernels.group_norm_silu(*args)[0]
