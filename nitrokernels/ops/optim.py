"""Sampled AdamW step: AdamW applied only to the rows (dim 0, e.g. heads of a pool) that received gradients.

`sampled_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, lr=, beta1=, beta2=, eps=, weight_decay=)`
updates, in place, for every parameter `p` [P, ...] the rows `r` present in its gradient:

    grad     sparse COO with sparse_dim 1 (indices = rows, values [n, ...]; repeated rows are summed),
             or dense (every row counts as present)
    step[r] += 1                                              (per-row float32 counters, steps [P])
    p[r]    *= 1 - lr * weight_decay                          (decoupled decay, only on present rows)
    m[r]     = lerp(m[r], g[r], 1 - beta1);  v[r] = beta2 * v[r] + (1 - beta2) * g[r]^2
    p[r]    -= lr / (1 - beta1^step[r]) * m[r] / (sqrt(v[r]) / sqrt(1 - beta2^step[r]) + eps)

which is torch.optim.AdamW's formula with a step counter per row. Rows absent from the gradient are not
read or written. Backends (see nitrokernels.ops.dispatch): "cuda_ext" = one multi-tensor launch by row
index (csrc/heads/sampled_adamw.cu; duplicates handled by sorting the indices on the device, so there is
no host sync) and "eager" = the plain index_select / index_copy_ reference below (coalesces the sparse
gradient, which syncs on CUDA).
"""
from __future__ import annotations

from typing import Sequence

import torch

from nitrokernels import _ext
from nitrokernels.ops.dispatch import dispatched_op

__all__ = ["sampled_adamw_", "sampled_adamw_reference_"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

sampled_adamw = dispatched_op("sampled_adamw", "AdamW step on the rows of pooled parameters that have gradients")


# ------------------------------------------------------------------------------------------- checks
def _check_inputs(params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == n):
        raise ValueError(f"sampled_adamw_: list lengths differ: params {n}, grads {len(grads)}, exp_avgs "
                         f"{len(exp_avgs)}, exp_avg_sqs {len(exp_avg_sqs)}, steps {len(steps)}")
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        if p.dim() == 0:
            raise ValueError(f"sampled_adamw_: param {i} is 0-dim; rows are indexed along dim 0")
        if p.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"sampled_adamw_: param {i} has dtype {p.dtype}; supported {_SUPPORTED_DTYPES}")
        for name, t in (("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if t.shape != p.shape:
                raise ValueError(f"sampled_adamw_: {name} {i} has shape {tuple(t.shape)}, param {tuple(p.shape)}")
            if t.dtype != p.dtype:
                raise TypeError(f"sampled_adamw_: {name} {i} has dtype {t.dtype}, param {p.dtype}")
            if t.device != p.device:
                raise ValueError(f"sampled_adamw_: {name} {i} is on {t.device}, param on {p.device}")
        if g.is_sparse and g.sparse_dim() != 1:
            raise ValueError(f"sampled_adamw_: sparse grad {i} must have sparse_dim 1 (rows), got {g.sparse_dim()}")
        if g.layout not in (torch.strided, torch.sparse_coo):
            raise TypeError(f"sampled_adamw_: grad {i} has layout {g.layout}; use dense or sparse COO")
        if s.shape != (p.shape[0],) or s.dtype != torch.float32 or s.device != p.device:
            raise ValueError(f"sampled_adamw_: steps {i} must be float32 [{p.shape[0]}] on {p.device}, got "
                             f"{s.dtype} {tuple(s.shape)} on {s.device}")


def sampled_adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                   exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], *, lr: float, beta1: float,
                   beta2: float, eps: float, weight_decay: float) -> None:
    """Apply one sampled AdamW step in place (see the module docstring); checks inputs, then dispatches."""
    params, grads, exp_avgs, exp_avg_sqs, steps = map(list, (params, grads, exp_avgs, exp_avg_sqs, steps))
    _check_inputs(params, grads, exp_avgs, exp_avg_sqs, steps)
    if not params:
        return
    sampled_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, lr=float(lr), beta1=float(beta1),
                  beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay))


# ------------------------------------------------------------------------------------ eager reference
def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def sampled_adamw_reference_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                             weight_decay) -> None:
    """Plain eager definition: gather the present rows, run AdamW's formula on them, write them back."""
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        if g.is_sparse:
            g = g.coalesce()  # sums repeated rows
            rows, values = g.indices()[0], g.values()
        else:
            rows, values = torch.arange(p.shape[0], device=p.device), g
        if rows.numel() == 0:
            continue
        op = _opmath(p.dtype)
        shape = (-1,) + (1,) * (p.dim() - 1)
        grad = values.to(op)
        param = p.index_select(0, rows).to(op)
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
        m.index_copy_(0, rows, exp_avg.to(m.dtype))
        v.index_copy_(0, rows, exp_avg_sq.to(v.dtype))


@sampled_adamw.register("eager")
def _sampled_adamw_eager(params, grads, exp_avgs, exp_avg_sqs, steps, **hyper) -> None:
    sampled_adamw_reference_(params, grads, exp_avgs, exp_avg_sqs, steps, **hyper)


# ------------------------------------------------------------------------------------ CUDA extension
def _cuda_reasons(params, grads, exp_avgs, exp_avg_sqs, steps, **hyper) -> list[str]:
    reasons = []
    if not hasattr(torch.ops.nitrokernels_cuda, "sampled_adamw_"):
        return ["the built extension has no sampled_adamw_ kernel (rebuild nitrokernels)"]
    for i, (p, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):
        if not (p.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            reasons.append(f"param {i} or its state is not contiguous")
    return reasons


@sampled_adamw.register("cuda_ext", check=_cuda_reasons)
@torch.no_grad()
def _sampled_adamw_cuda(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                        weight_decay) -> None:
    assert _ext.extension_available()
    values, rows, perms = [], [], []
    for p, g in zip(params, grads):
        if g.is_sparse:
            # Sorting the (uncoalesced) indices keeps the entry count fixed: the kernel sums each run of
            # equal rows in its first entry and skips the others, so nothing here syncs with the host.
            idx = g._indices()[0]
            sorted_rows, perm = torch.sort(idx)
            values.append(g._values().contiguous())
            rows.append(sorted_rows.contiguous())
            perms.append(perm.contiguous())
        else:
            values.append(g.contiguous())
            rows.append(torch.arange(p.shape[0], device=p.device))
            perms.append(None)
    torch.ops.nitrokernels_cuda.sampled_adamw_(params, values, rows, perms, list(exp_avgs), list(exp_avg_sqs),
                                               list(steps), lr, beta1, beta2, eps, weight_decay)


@sampled_adamw.set_example
def _example(device: torch.device):
    p = torch.randn(8, 16, 4, device=device)
    g = torch.sparse_coo_tensor(torch.tensor([[3, 1, 3]], device=device), torch.randn(3, 16, 4, device=device), p.shape,
                                check_invariants=False)
    state = (torch.zeros_like(p), torch.zeros_like(p), torch.zeros(8, device=device))
    return ([p], [g], [state[0]], [state[1]], [state[2]]), dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                                                  weight_decay=1e-2)
