"""Sampled AdamW step: AdamW applied only to the rows (dim 0, e.g. heads of a pool) that received gradients.

`sampled_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, masters=None, lr=, beta1=, beta2=, eps=,
weight_decay=)` updates, in place, for every parameter `p` [P, ...] the rows `r` present in its gradient:

    grad     sparse COO with sparse_dim 1 (indices = rows, values [n, ...]; repeated rows are summed in entry
             order, sequentially in the math dtype: a deterministic order, the same on every backend),
             or dense (every row counts as present)
    w        the row's master value: masters[i][r] (fp32) for bf16/fp16 params, p[r] itself otherwise; a
             master element whose rounding no longer equals p (p was written behind the optimiser's back,
             e.g. a re-initialised head) is first re-read from p
    step[r] += 1                                              (per-row float32 counters, steps [P])
    w       *= 1 - lr * weight_decay                          (decoupled decay, only on present rows)
    m[r]     = lerp(m[r], g[r], 1 - beta1);  v[r] = beta2 * v[r] + (1 - beta2) * g[r]^2
    w       -= lr / (1 - beta1^step[r]) * m[r] / (sqrt(v[r]) / sqrt(1 - beta2^step[r]) + eps)
    p[r]     = round(w) (to p's dtype), masters[i][r] = w

which is torch.optim.AdamW's formula with a step counter per row. Moments (and masters) are kept in the math
dtype: float32 for 16-bit and float32 params, float64 for float64 ones. With bf16 storage alone an update
smaller than half a bf16 ulp of the weight would be rounded away every step (lr 1e-5 on |w| ~ 0.007) and a
bf16 second moment stalls once (1 - beta2) g^2 is below its ulp; the fp32 state keeps both.
Rows absent from the gradient are not read or written. Backends (see nitrokernels.ops.dispatch): "cuda_ext" =
one multi-tensor launch by row index (csrc/heads/sampled_adamw.cu; duplicates handled by a stable sort of the
indices on the device, so there is no host sync) and "eager" = the plain index_select / index_copy_ reference
below (groups the repeated rows on the host, which syncs on CUDA).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from nitrokernels import _ext
from nitrokernels.ops.dispatch import dispatched_op

__all__ = ["sampled_adamw_", "sampled_adamw_reference_", "state_dtype", "needs_master"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

sampled_adamw = dispatched_op("sampled_adamw", "AdamW step on the rows of pooled parameters that have gradients")


# ------------------------------------------------------------------------------------------- checks
def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the moments and master rows of a parameter of `dtype` (its math dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def needs_master(dtype: torch.dtype) -> bool:
    """Whether a parameter of `dtype` keeps fp32 master rows (16-bit storage)."""
    return dtype in (torch.float16, torch.bfloat16)


def check_hyperparameters(owner: str, lr, beta1, beta2, eps, weight_decay) -> None:
    """Clear errors for hyperparameters that would otherwise give NaN weights or a torch-internal message:
    each must be a real number (TypeError), finite, lr / eps / weight_decay >= 0, betas in [0, 1) (ValueError)."""
    for name, value in (("lr (learning rate)", lr), ("betas[0] (beta1)", beta1), ("betas[1] (beta2)", beta2), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type == "cpu":
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{owner}: {name} must be finite, got {value!r}")
        if name.startswith("betas"):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{owner}: {name} must be in [0, 1), got {value!r}")
        elif value < 0:
            raise ValueError(f"{owner}: {name} must be >= 0, got {value!r}")


def check_sparse_rows(i: int, p: torch.Tensor, g: torch.Tensor, on_device: bool = True) -> None:
    """Row indices of sparse grad `i` must lie in [0, p.shape[0]) (an invalid one would crash torch's coalesce
    or write out of bounds in a kernel). CPU: always checked. Other devices: one host sync, when `on_device`
    (skipped during CUDA-graph capture)."""
    if not g.is_sparse:
        return
    idx = g._indices()
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"sampled_adamw_: sparse grad {i} has {idx.dtype} indices; expected int64")
    if idx.numel() == 0:
        return
    if idx.device.type != "cpu":
        if not on_device or (idx.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return
    rows = idx[0]
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= p.shape[0]:
        raise ValueError(f"sampled_adamw_: sparse grad {i} has row indices in [{low}, {high}], outside the "
                         f"parameter's rows [0, {p.shape[0]}) (param shape {tuple(p.shape)})")
    if g._values().shape[0] != idx.shape[1]:
        raise ValueError(f"sampled_adamw_: sparse grad {i} has {idx.shape[1]} indices but {g._values().shape[0]} "
                         f"value rows")


def _check_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, masters, check_rows: bool = True) -> None:
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == len(masters) == n):
        raise ValueError(f"sampled_adamw_: list lengths differ: params {n}, grads {len(grads)}, exp_avgs "
                         f"{len(exp_avgs)}, exp_avg_sqs {len(exp_avg_sqs)}, steps {len(steps)}, masters {len(masters)}")
    for i, (p, g, m, v, s, w) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, masters)):
        if p.dim() == 0:
            raise ValueError(f"sampled_adamw_: param {i} is 0-dim; rows are indexed along dim 0")
        if p.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"sampled_adamw_: param {i} has dtype {p.dtype}; supported {_SUPPORTED_DTYPES}")
        sdt = state_dtype(p.dtype)
        if needs_master(p.dtype) and w is None:
            raise ValueError(f"sampled_adamw_: param {i} is {p.dtype}: pass its float32 master copy (masters[{i}])")
        if not needs_master(p.dtype) and w is not None:
            raise ValueError(f"sampled_adamw_: param {i} is {p.dtype}: it is its own master (masters[{i}] = None)")
        checks = (("grad", g, p.dtype), ("exp_avg", m, sdt), ("exp_avg_sq", v, sdt)) + \
            ((("master", w, torch.float32),) if w is not None else ())
        for name, t, dt in checks:
            if t.shape != p.shape:
                raise ValueError(f"sampled_adamw_: {name} {i} has shape {tuple(t.shape)}, param {tuple(p.shape)}")
            if t.dtype != dt:
                raise TypeError(f"sampled_adamw_: {name} {i} has dtype {t.dtype}, expected {dt} (param {p.dtype})")
            if t.device != p.device:
                raise ValueError(f"sampled_adamw_: {name} {i} is on {t.device}, param on {p.device}")
        if g.is_sparse and g.sparse_dim() != 1:
            raise ValueError(f"sampled_adamw_: sparse grad {i} must have sparse_dim 1 (rows), got {g.sparse_dim()}")
        if g.layout not in (torch.strided, torch.sparse_coo):
            raise TypeError(f"sampled_adamw_: grad {i} has layout {g.layout}; use dense or sparse COO")
        check_sparse_rows(i, p, g, on_device=check_rows)
        if s.shape != (p.shape[0],) or s.dtype != torch.float32 or s.device != p.device:
            raise ValueError(f"sampled_adamw_: steps {i} must be float32 [{p.shape[0]}] on {p.device}, got "
                             f"{s.dtype} {tuple(s.shape)} on {s.device}")


def sampled_adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                   exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor],
                   masters: Sequence[torch.Tensor | None] | None = None, *, lr: float, beta1: float,
                   beta2: float, eps: float, weight_decay: float, check_rows: bool = True) -> None:
    """Apply one sampled AdamW step in place (see the module docstring); checks inputs, then dispatches.
    `masters`: per param its float32 master copy (bf16/fp16 params) or None; default all None.
    `check_rows`: verify sparse row indices on GPU too (one host sync; CPU tensors are always checked)."""
    check_hyperparameters("sampled_adamw_", lr, beta1, beta2, eps, weight_decay)
    params, grads, exp_avgs, exp_avg_sqs, steps = map(list, (params, grads, exp_avgs, exp_avg_sqs, steps))
    masters = [None] * len(params) if masters is None else list(masters)
    _check_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, masters, check_rows)
    if not params:
        return
    sampled_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, masters, lr=float(lr), beta1=float(beta1),
                  beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay))


# ------------------------------------------------------------------------------------ eager reference
def _opmath(dtype: torch.dtype) -> torch.dtype:
    return state_dtype(dtype)


def sum_rows_in_order(rows: torch.Tensor, values: torch.Tensor, dtype: torch.dtype):
    """(unique rows ascending, per-row sums) of a sparse gradient's entries, each sum accumulated sequentially
    in entry order in `dtype` (((0 + v_a) + v_b) + ...): the order the CUDA kernel uses (stable sort)."""
    sorted_rows, perm = torch.sort(rows, stable=True)
    vals = values.index_select(0, perm).to(dtype)
    uniq, inverse, counts = torch.unique_consecutive(sorted_rows, return_inverse=True, return_counts=True)
    pos = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[inverse]
    total = torch.zeros((uniq.numel(),) + tuple(values.shape[1:]), dtype=dtype, device=values.device)
    for k in range(int(counts.max()) if counts.numel() else 0):   # every target at most once per pass
        sel = (pos == k).nonzero().view(-1)
        total.index_add_(0, inverse.index_select(0, sel), vals.index_select(0, sel))
    return uniq, total


@torch.no_grad()
def sampled_adamw_reference_(params, grads, exp_avgs, exp_avg_sqs, steps, masters=None, *, lr, beta1, beta2, eps,
                             weight_decay) -> None:
    """Plain eager definition: gather the present rows, run AdamW's formula on them, write them back."""
    masters = [None] * len(params) if masters is None else masters
    for p, g, m, v, s, w in zip(params, grads, exp_avgs, exp_avg_sqs, steps, masters):
        op = _opmath(p.dtype)
        if g.is_sparse:
            rows, grad = sum_rows_in_order(g._indices()[0], g._values(), op)
        else:
            rows, grad = torch.arange(p.shape[0], device=p.device), g.to(op)
        if rows.numel() == 0:
            continue
        shape = (-1,) + (1,) * (p.dim() - 1)
        stored = p.index_select(0, rows)
        if w is not None:      # the master, unless p was changed behind the optimiser's back
            master = w.index_select(0, rows)
            param = torch.where(master.to(p.dtype) == stored, master, stored.to(op))
        else:
            param = stored.to(op)
        exp_avg = m.index_select(0, rows).to(op)
        exp_avg_sq = v.index_select(0, rows).to(op)
        step = s.index_select(0, rows) + 1
        s.index_copy_(0, rows, step)

        step64 = step.to(torch.float64)
        bias_correction1 = 1 - torch.pow(beta1, step64)
        bias_correction2_sqrt = (1 - torch.pow(beta2, step64)).sqrt()
        step_size = (lr / bias_correction1).to(op).view(shape)

        param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt.to(op).view(shape)).add_(eps)
        param.sub_(step_size * exp_avg / denom)

        p.index_copy_(0, rows, param.to(p.dtype))
        if w is not None:
            w.index_copy_(0, rows, param)
        m.index_copy_(0, rows, exp_avg.to(m.dtype))
        v.index_copy_(0, rows, exp_avg_sq.to(v.dtype))


@sampled_adamw.register("eager")
def _sampled_adamw_eager(params, grads, exp_avgs, exp_avg_sqs, steps, masters, **hyper) -> None:
    sampled_adamw_reference_(params, grads, exp_avgs, exp_avg_sqs, steps, masters, **hyper)


# ------------------------------------------------------------------------------------ CUDA extension
def _cuda_reasons(params, grads, exp_avgs, exp_avg_sqs, steps, masters, **hyper) -> list[str]:
    reasons = []
    if not hasattr(torch.ops.nitrokernels_cuda, "sampled_adamw_"):
        return ["the built extension has no sampled_adamw_ kernel (rebuild nitrokernels)"]
    for i, (p, m, v, w) in enumerate(zip(params, exp_avgs, exp_avg_sqs, masters)):
        if not (p.is_contiguous() and m.is_contiguous() and v.is_contiguous() and (w is None or w.is_contiguous())):
            reasons.append(f"param {i} or its state is not contiguous")
    return reasons


def kernel_arguments(params, grads):
    """(values, sorted rows, permutations) the CUDA kernel takes: a STABLE sort of each sparse gradient's
    (uncoalesced) indices keeps the entry count fixed and the summation order the entry order, with no sync."""
    values, rows, perms = [], [], []
    for p, g in zip(params, grads):
        if g.is_sparse:
            sorted_rows, perm = torch.sort(g._indices()[0], stable=True)
            values.append(g._values().contiguous())
            rows.append(sorted_rows.contiguous())
            perms.append(perm.contiguous())
        else:
            values.append(g.contiguous())
            rows.append(torch.arange(p.shape[0], device=p.device))
            perms.append(None)
    return values, rows, perms


@sampled_adamw.register("cuda_ext", check=_cuda_reasons)
@torch.no_grad()
def _sampled_adamw_cuda(params, grads, exp_avgs, exp_avg_sqs, steps, masters, *, lr, beta1, beta2, eps,
                        weight_decay) -> None:
    assert _ext.extension_available()
    values, rows, perms = kernel_arguments(params, grads)
    torch.ops.nitrokernels_cuda.sampled_adamw_(params, values, rows, perms, list(exp_avgs), list(exp_avg_sqs),
                                               list(steps), list(masters), lr, beta1, beta2, eps, weight_decay)


@sampled_adamw.set_example
def _example(device: torch.device):
    p = torch.randn(8, 16, 4, device=device)
    g = torch.sparse_coo_tensor(torch.tensor([[3, 1, 3]], device=device), torch.randn(3, 16, 4, device=device), p.shape,
                                check_invariants=False)
    state = (torch.zeros_like(p), torch.zeros_like(p), torch.zeros(8, device=device))
    return ([p], [g], [state[0]], [state[1]], [state[2]], [None]), dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                                                         weight_decay=1e-2)
