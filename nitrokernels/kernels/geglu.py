"""GEGLU in Triton: the projection GEMM with the gate * GELU epilogue, and the activation backward.

diffusers' GEGLU is  proj = x @ W^T + b  ([M, 2N]);  hidden, gate = proj.chunk(2, -1);  out = hidden * gelu(gate)
(exact erf GELU). Eager runs a GEMM that writes [M, 2N], then chunk + GELU + multiply kernels that read it back.

Forward (_geglu_fwd): each program owns a BLOCK_M x BLOCK_N tile of the output and accumulates TWO tiles of
the projection in fp32 -- rows n of W (hidden) and rows N + n (gate) -- over K, then applies bias and
hidden * gelu(gate) in registers and writes only [M, N]. With SAVE=True (training) it also writes the
pre-activation proj [M, 2N] (hidden | gate, in the input dtype): the backward *stores* rather than
recomputes it, the same memory eager autograd keeps (eager saves the proj output too), and no GEMM is redone.

Backward: _geglu_bwd_act turns (grad_out [M, N], proj [M, 2N]) into grad_proj [M, 2N]:
    d_hidden = g * gelu(gate),   d_gate = g * hidden * gelu'(gate),   gelu'(z) = Phi(z) + z * phi(z)
and the three GEMMs of a linear layer (dx = grad_proj @ W, dW = grad_proj^T @ x, db = sum(grad_proj)) run in
cuBLAS through torch (ops/geglu.py).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# tl.constexpr: the GPU compiler rejects plain-float globals inside @jit functions (the interpreter accepts them)
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def _empty(*shape, dtype, device) -> torch.Tensor:
    """Output allocation (one place, so tests can poison it)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _fwd_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4,
                              num_stages=1)]
    shapes = [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
              (128, 64, 32, 4, 5), (64, 64, 64, 4, 4), (128, 128, 32, 8, 4), (256, 64, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


@triton.autotune(configs=_fwd_configs(), key=["M", "N", "K", "SAVE", "IEEE"])
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _geglu_fwd(X, W, BIAS, OUT, PRE, M, N, K,
               s_xm, s_xk, s_wn, s_wk, s_om, s_on, s_pm, s_pn,
               HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-blocks share the W tiles they read while those sit in L2
    num_in_group = GROUP_M * num_pid_n
    group = pid // num_in_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m % M  # out-of-range rows / columns read valid memory; their results are never stored
    cols = offs_n % N
    x_ptrs = X + rows[:, None].to(tl.int64) * s_xm + offs_k[None, :] * s_xk
    wa_ptrs = W + cols[:, None].to(tl.int64) * s_wn + offs_k[None, :] * s_wk
    wg_ptrs = wa_ptrs + N * s_wn

    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            wa = tl.load(wa_ptrs)
            wg = tl.load(wg_ptrs)
        else:
            k_ok = offs_k[None, :] < K - kk * BLOCK_K
            x = tl.load(x_ptrs, mask=k_ok, other=0.0)
            wa = tl.load(wa_ptrs, mask=k_ok, other=0.0)
            wg = tl.load(wg_ptrs, mask=k_ok, other=0.0)
        if IEEE:
            acc_a = tl.dot(x, tl.trans(wa), acc_a, input_precision="ieee")
            acc_g = tl.dot(x, tl.trans(wg), acc_g, input_precision="ieee")
        else:
            acc_a = tl.dot(x, tl.trans(wa), acc_a)
            acc_g = tl.dot(x, tl.trans(wg), acc_g)
        x_ptrs += BLOCK_K * s_xk
        wa_ptrs += BLOCK_K * s_wk
        wg_ptrs += BLOCK_K * s_wk

    if HAS_BIAS:
        acc_a += tl.load(BIAS + cols).to(tl.float32)[None, :]
        acc_g += tl.load(BIAS + N + cols).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    m64 = offs_m[:, None].to(tl.int64)
    if SAVE:
        # saved for the backward in the input dtype; `out` below uses the unrounded fp32 values
        a_st = acc_a.to(PRE.dtype.element_ty)
        g_st = acc_g.to(PRE.dtype.element_ty)
        tl.store(PRE + m64 * s_pm + offs_n[None, :] * s_pn, a_st, mask=mask)
        tl.store(PRE + m64 * s_pm + (N + offs_n[None, :]) * s_pn, g_st, mask=mask)
    gelu = 0.5 * acc_g * (1.0 + tl.math.erf(acc_g * _SQRT1_2))
    out = acc_a * gelu
    tl.store(OUT + m64 * s_om + offs_n[None, :] * s_on, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_act(DOUT, PRE, DPRE, M, N, s_dm, s_dn, s_pm, s_pn, s_qm, s_qn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    m64 = offs_m[:, None].to(tl.int64)
    g = tl.load(DOUT + m64 * s_dm + offs_n[None, :] * s_dn, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(PRE + m64 * s_pm + offs_n[None, :] * s_pn, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(PRE + m64 * s_pm + (N + offs_n[None, :]) * s_pn, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
    pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    d_a = g * (z * cdf)
    d_z = g * a * (cdf + z * pdf)
    tl.store(DPRE + m64 * s_qm + offs_n[None, :] * s_qn, d_a.to(DPRE.dtype.element_ty), mask=mask)
    tl.store(DPRE + m64 * s_qm + (N + offs_n[None, :]) * s_qn, d_z.to(DPRE.dtype.element_ty), mask=mask)


def geglu_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, save: bool):
    """x2d [M, K], weight [2N, K], bias [2N] or None -> (out [M, N], proj [M, 2N] if save else empty [0])."""
    m, k = x2d.shape
    n = weight.shape[0] // 2
    out = _empty(m, n, dtype=x2d.dtype, device=x2d.device)
    pre = _empty(m, 2 * n, dtype=x2d.dtype, device=x2d.device) if save else x2d.new_empty(0)
    if m == 0 or n == 0:
        return out, pre
    s_pm, s_pn = pre.stride() if save else (0, 0)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _geglu_fwd[grid](x2d, weight, bias if bias is not None else weight, out, pre, m, n, k,
                     *x2d.stride(), *weight.stride(), *out.stride(), s_pm, s_pn,
                     HAS_BIAS=bias is not None, SAVE=save, IEEE=x2d.dtype == torch.float32)
    return out, pre


def geglu_backward_act(grad_out: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """grad of the projection output [M, 2N] from grad_out [M, N] and the saved projection [M, 2N]."""
    m, n = grad_out.shape
    dpre = _empty(m, 2 * n, dtype=pre.dtype, device=pre.device)
    if m == 0 or n == 0:
        return dpre
    block_m, block_n = (16, 16) if _INTERPRET else (8, 256)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _geglu_bwd_act[grid](grad_out, pre, dpre, m, n, *grad_out.stride(), *pre.stride(), *dpre.stride(),
                         BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return dpre
