"""Flash attention in Triton: forward (online softmax, saves the log-sum-exp) and backward (dq, dk, dv).

Inputs are [B, H, L, D] tensors with arbitrary strides (the attention processor passes transposed views of
[B, L, H*D] projections, and slices of one fused QKV projection, without copying). Lq and Lk are arbitrary
(ragged tails are masked; cross-attention has Lk = 77); the head dim D is any value up to 128 (power-of-two
head dims run without a D mask, other sizes are padded to the next power of two inside the kernel).

Forward, per (query block, batch*head): stream over key blocks keeping the running max m and running sum l
of exp2(s - m) in fp32 (scores s are pre-multiplied by scale*log2(e) so the kernel uses exp2), rescale the
accumulator when the max grows, divide once at the end, and store lse2 = m + log2(l) (base-2 log-sum-exp of
the scaled scores; fp32, [B, H, Lq]) for the backward.

Backward (FlashAttention-2 without atomics, deterministic):
  1. delta = rowsum(dO * O)                                          (_attn_bwd_preprocess)
  2. per key block: loop over query blocks, P^T = exp2(s^T - lse2), dV += P^T dO,
     dS^T = P^T * (V dO^T - delta), dK += dS^T Q                      (_attn_bwd_dkdv)
     When there are few key blocks (cross-attention: Lk = 77) the query loop is split over several programs
     that write fp32 partial sums, added afterwards, so the GPU is not left mostly idle.
  3. per query block: loop over key blocks, recompute P and dP, dQ += dS K   (_attn_bwd_dq)
Step 3 recomputes two matmuls that step 2 already did (7 instead of 5 matmuls) in exchange for no atomics.

Outputs follow the input layout: when q is a transposed view of a [B, L, H, D] buffer (heads inner to the
sequence), out is allocated the same way, so `out.transpose(1, 2).reshape(B, L, H*D)` is free.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
MAX_HEAD_DIM = 128


def padded_head_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def empty_like_layout(ref: torch.Tensor, length: int, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty [B, H, length, dim] tensor laid out like `ref` ([B, L, H, D] memory when ref is a transposed
    view with heads inner to the sequence, else contiguous [B, H, L, D]). Used by the real and fake impls."""
    b, h = ref.shape[0], ref.shape[1]
    dtype = dtype or ref.dtype
    if ref.stride(1) < ref.stride(2):
        return torch.empty(b, length, h, dim, dtype=dtype, device=ref.device).transpose(1, 2)
    return torch.empty(b, h, length, dim, dtype=dtype, device=ref.device)


# ------------------------------------------------------------------------------------------ jit helpers
@triton.jit
def _load_rows(ptrs, offs_rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr,
               MASK_D: tl.constexpr):
    if MASK_ROWS:
        if MASK_D:
            t = tl.load(ptrs, mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            t = tl.load(ptrs, mask=offs_rows[:, None] < n_rows, other=0.0)
    else:
        if MASK_D:
            t = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _store_rows(ptrs, value, offs_rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr,
                MASK_D: tl.constexpr):
    if MASK_ROWS:
        if MASK_D:
            tl.store(ptrs, value, mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))
        else:
            tl.store(ptrs, value, mask=offs_rows[:, None] < n_rows)
    else:
        if MASK_D:
            tl.store(ptrs, value, mask=offs_d[None, :] < HEAD_DIM)
        else:
            tl.store(ptrs, value)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# ---------------------------------------------------------------------------------------------- forward
@triton.jit
def _attn_fwd_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_n, offs_d, s_kn, s_kd, s_vn, s_vd, Lk,
                   qk_scale, HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    offs_kn = start_n + offs_n
    k = _load_rows(k_base + offs_kn[:, None] * s_kn + offs_d[None, :] * s_kd, offs_kn, Lk, offs_d,
                   HEAD_DIM, MASK_N, MASK_D)
    qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE) * qk_scale
    if MASK_N:
        qk = tl.where(offs_kn[None, :] < Lk, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_rows(v_base + offs_kn[:, None] * s_vn + offs_d[None, :] * s_vd, offs_kn, Lk, offs_d,
                   HEAD_DIM, MASK_N, MASK_D)
    acc = _dot(p.to(v.dtype), v, acc, IEEE)
    return acc, l_i, m_new


def _fwd_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    configs = []
    for bm, bn, warps, stages in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4),
                                  (128, 32, 4, 4), (64, 64, 4, 3), (128, 128, 4, 3), (64, 128, 4, 3)]:
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return configs


def _prune_fwd(configs, named_args, **kwargs):
    d_pad = named_args.get("D_PAD", kwargs.get("D_PAD", 64))
    lk = named_args.get("Lk", kwargs.get("Lk", 1 << 30))
    kept = [c for c in configs
            if not (d_pad > 64 and c.kwargs["BLOCK_N"] > 64 and c.num_warps < 8)  # register pressure at D=128
            and not (lk <= 64 and c.kwargs["BLOCK_N"] > 64)]
    return kept or configs


@triton.autotune(configs=_fwd_configs(), key=["Lq", "Lk", "HEAD_DIM", "IEEE"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.heuristics({"MASK_M": lambda a: a["Lq"] % a["BLOCK_M"] != 0,
                    "MASK_N": lambda a: a["Lk"] % a["BLOCK_N"] != 0})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_om, s_od,
              H, Lq, Lk, qk_scale,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, MASK_D: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)

    q = _load_rows(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, offs_m, Lq,
                   offs_d, HEAD_DIM, MASK_M, MASK_D)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_n, offs_d,
                                       s_kn, s_kd, s_vn, s_vd, Lk, qk_scale, HEAD_DIM, False, MASK_D,
                                       BLOCK_M, BLOCK_N, IEEE)
    if MASK_N:
        acc, l_i, m_i = _attn_fwd_step(acc, l_i, m_i, q, k_base, v_base, n_full, offs_n, offs_d,
                                       s_kn, s_kd, s_vn, s_vd, Lk, qk_scale, HEAD_DIM, True, MASK_D,
                                       BLOCK_M, BLOCK_N, IEEE)

    acc = acc / l_i[:, None]
    _store_rows(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
                acc.to(O.dtype.element_ty), offs_m, Lq, offs_d, HEAD_DIM, MASK_M, MASK_D)
    lse_ptrs = LSE + pid_bh.to(tl.int64) * Lq + offs_m
    lse = m_i + tl.math.log2(l_i)
    if MASK_M:
        tl.store(lse_ptrs, lse, mask=offs_m < Lq)
    else:
        tl.store(lse_ptrs, lse)


# --------------------------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, s_ob, s_oh, s_om, s_od, s_db, s_dh, s_dm, s_dd, H, Lq,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=mask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


def _dkdv_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm, w, s in [(32, 4, 3), (64, 4, 3), (64, 8, 3), (32, 4, 4), (64, 8, 4), (128, 8, 3)]]


@triton.autotune(configs=_dkdv_configs(), key=["Lq", "Lk", "HEAD_DIM", "BLOCK_N", "ROWS_PER_SPLIT", "IEEE"])
@triton.heuristics({"MASK_M": lambda a: a["Lq"] % a["BLOCK_M"] != 0,
                    "MASK_N": lambda a: a["Lk"] % a["BLOCK_N"] != 0})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                   s_dob, s_doh, s_dom, s_dod, s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dvd,
                   s_split, H, Lq, Lk, qk_scale, sm_scale, ROWS_PER_SPLIT,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, MASK_D: tl.constexpr, IEEE: tl.constexpr,
                   PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   MASK_M: tl.constexpr, MASK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)

    k = _load_rows(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, offs_n, Lk,
                   offs_d, HEAD_DIM, MASK_N, MASK_D)
    v = _load_rows(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, offs_n, Lk,
                   offs_d, HEAD_DIM, MASK_N, MASK_D)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)

    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_dob + h * s_doh
    row_base = pid_bh.to(tl.int64) * Lq
    m_start = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, Lq)
    for start_m in range(m_start, m_end, BLOCK_M):
        offs_qm = start_m + offs_m
        q = _load_rows(q_base + offs_qm[:, None] * s_qm + offs_d[None, :] * s_qd, offs_qm, Lq, offs_d,
                       HEAD_DIM, MASK_M, MASK_D)
        do = _load_rows(do_base + offs_qm[:, None] * s_dom + offs_d[None, :] * s_dod, offs_qm, Lq, offs_d,
                        HEAD_DIM, MASK_M, MASK_D)
        if MASK_M:
            lse = tl.load(LSE + row_base + offs_qm, mask=offs_qm < Lq, other=0.0)
            delta = tl.load(DELTA + row_base + offs_qm, mask=offs_qm < Lq, other=0.0)
        else:
            lse = tl.load(LSE + row_base + offs_qm)
            delta = tl.load(DELTA + row_base + offs_qm)
        # Rows past Lq load q = dO = lse = delta = 0: their P^T column is 1 and dS^T column 0, so they add 0.
        # Keys past Lk (k = v = 0) only pollute their own dK/dV rows, which are never stored.
        qk_t = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE)
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        dv = _dot(p_t.to(do.dtype), do, dv, IEEE)
        dp_t = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q.dtype), q, dk, IEEE)
    dk = dk * sm_scale

    if PARTIAL:  # fp32 partial sums [split, B, H, Lk, D] (contiguous), summed by the host
        part = pid_s.to(tl.int64) * s_split + pid_bh.to(tl.int64) * Lk * HEAD_DIM
        ptrs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        _store_rows(DK + part + ptrs, dk, offs_n, Lk, offs_d, HEAD_DIM, MASK_N, MASK_D)
        _store_rows(DV + part + ptrs, dv, offs_n, Lk, offs_d, HEAD_DIM, MASK_N, MASK_D)
    else:
        _store_rows(DK + b * s_dkb + h * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd,
                    dk.to(DK.dtype.element_ty), offs_n, Lk, offs_d, HEAD_DIM, MASK_N, MASK_D)
        _store_rows(DV + b * s_dvb + h * s_dvh + offs_n[:, None] * s_dvn + offs_d[None, :] * s_dvd,
                    dv.to(DV.dtype.element_ty), offs_n, Lk, offs_d, HEAD_DIM, MASK_N, MASK_D)


def _dq_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 4),
                                 (64, 32, 4, 4), (128, 64, 4, 3)]]


@triton.autotune(configs=_dq_configs(), key=["Lq", "Lk", "HEAD_DIM", "IEEE"])
@triton.heuristics({"MASK_M": lambda a: a["Lq"] % a["BLOCK_M"] != 0,
                    "MASK_N": lambda a: a["Lk"] % a["BLOCK_N"] != 0})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                 s_dob, s_doh, s_dom, s_dod, s_dqb, s_dqh, s_dqm, s_dqd,
                 H, Lq, Lk, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, MASK_D: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)

    q = _load_rows(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, offs_m, Lq,
                   offs_d, HEAD_DIM, MASK_M, MASK_D)
    do = _load_rows(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod, offs_m,
                    Lq, offs_d, HEAD_DIM, MASK_M, MASK_D)
    row_base = pid_bh.to(tl.int64) * Lq
    if MASK_M:
        lse = tl.load(LSE + row_base + offs_m, mask=offs_m < Lq, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Lq, other=0.0)
    else:
        lse = tl.load(LSE + row_base + offs_m)
        delta = tl.load(DELTA + row_base + offs_m)

    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _attn_bwd_dq_step(dq, q, do, lse, delta, k_base, v_base, start_n, offs_n, offs_d,
                               s_kn, s_kd, s_vn, s_vd, Lk, qk_scale, HEAD_DIM, False, MASK_D,
                               BLOCK_M, BLOCK_N, IEEE)
    if MASK_N:
        dq = _attn_bwd_dq_step(dq, q, do, lse, delta, k_base, v_base, n_full, offs_n, offs_d,
                               s_kn, s_kd, s_vn, s_vd, Lk, qk_scale, HEAD_DIM, True, MASK_D,
                               BLOCK_M, BLOCK_N, IEEE)
    dq = dq * sm_scale
    _store_rows(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd,
                dq.to(DQ.dtype.element_ty), offs_m, Lq, offs_d, HEAD_DIM, MASK_M, MASK_D)


@triton.jit
def _attn_bwd_dq_step(dq, q, do, lse, delta, k_base, v_base, start_n, offs_n, offs_d, s_kn, s_kd, s_vn, s_vd,
                      Lk, qk_scale, HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    offs_kn = start_n + offs_n
    k = _load_rows(k_base + offs_kn[:, None] * s_kn + offs_d[None, :] * s_kd, offs_kn, Lk, offs_d,
                   HEAD_DIM, MASK_N, MASK_D)
    v = _load_rows(v_base + offs_kn[:, None] * s_vn + offs_d[None, :] * s_vd, offs_kn, Lk, offs_d,
                   HEAD_DIM, MASK_N, MASK_D)
    qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if MASK_N:  # k = 0 past Lk gives p = exp2(-lse), which may overflow: zero it before it meets dS K
        p = tl.where(offs_kn[None, :] < Lk, p, 0.0)
    dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
    ds = p * (dp - delta[:, None])
    return _dot(ds.to(k.dtype), k, dq, IEEE)


# ------------------------------------------------------------------------------------------ host wrappers
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _dkdv_block_n(d_pad: int) -> int:
    if _INTERPRET:
        return 16
    return 128 if d_pad <= 64 else 64


def flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """out [B, H, Lq, D] (layout of q), lse2 [B, H, Lq] fp32 (base-2 log-sum-exp of scale*log2(e)*q.k)."""
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    out = empty_like_layout(q, lq, d)
    lse = torch.empty(batch, heads, lq, dtype=torch.float32, device=q.device)
    if lq == 0 or batch * heads == 0:
        return out, lse
    d_pad = padded_head_dim(d)
    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _attn_fwd[grid](q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                    heads, lq, lk, scale * LOG2E,
                    HEAD_DIM=d, D_PAD=d_pad, MASK_D=d != d_pad, IEEE=q.dtype == torch.float32)
    return out, lse


def flash_attn_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, scale: float):
    """dq, dk, dv laid out like q, k, v."""
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    dq = empty_like_layout(q, lq, d)
    dk = empty_like_layout(k, lk, d)
    dv = empty_like_layout(v, lk, d)
    if batch * heads == 0 or lk == 0:
        return dq, dk, dv
    if lq == 0:
        return dq, dk.zero_(), dv.zero_()
    d_pad = padded_head_dim(d)
    bh = batch * heads
    ieee = q.dtype == torch.float32

    delta = torch.empty(batch, heads, lq, dtype=torch.float32, device=q.device)
    pre_block = 64 if not _INTERPRET else 16
    _attn_bwd_preprocess[(triton.cdiv(lq, pre_block), bh)](
        out, do, delta, *out.stride(), *do.stride(), heads, lq, HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=pre_block)

    # dK, dV: one program per key block; split the query loop when that leaves the GPU underused.
    block_n = _dkdv_block_n(d_pad)
    key_programs = triton.cdiv(lk, block_n) * bh
    split = max(1, min(triton.cdiv(2 * _num_sms(q.device), key_programs), triton.cdiv(lq, 128)))
    rows_per_split = triton.cdiv(triton.cdiv(lq, split), 128) * 128
    split = triton.cdiv(lq, rows_per_split)
    if split > 1:
        dk_buf = torch.empty(split, batch, heads, lk, d, dtype=torch.float32, device=q.device)
        dv_buf = torch.empty_like(dk_buf)
        strides_dk = strides_dv = (0, 0, 0, 0)
        s_split = dk_buf.stride(0)
    else:
        dk_buf, dv_buf = dk, dv
        strides_dk, strides_dv = dk.stride(), dv.stride()
        s_split = 0
    _attn_bwd_dkdv[(triton.cdiv(lk, block_n), bh, split)](
        q, k, v, do, lse, delta, dk_buf, dv_buf, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *strides_dk, *strides_dv, s_split, heads, lq, lk, scale * LOG2E, scale, rows_per_split,
        HEAD_DIM=d, D_PAD=d_pad, MASK_D=d != d_pad, IEEE=ieee, PARTIAL=split > 1, BLOCK_N=block_n)
    if split > 1:
        dk.copy_(dk_buf.sum(0))
        dv.copy_(dv_buf.sum(0))

    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), bh)  # noqa: E731
    _attn_bwd_dq[grid](q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                       *dq.stride(), heads, lq, lk, scale * LOG2E, scale,
                       HEAD_DIM=d, D_PAD=d_pad, MASK_D=d != d_pad, IEEE=ieee)
    return dq, dk, dv


def attention_flops(batch: int, heads: int, lq: int, lk: int, d: int, backward: bool = False) -> float:
    """Matmul FLOPs of attention: 2 matmuls forward, 5 backward (the minimum, not what a kernel recomputes)."""
    fwd = 4.0 * batch * heads * lq * lk * d
    return fwd * (3.5 if backward else 1.0)


__all__ = ["flash_attn_forward", "flash_attn_backward", "empty_like_layout", "padded_head_dim", "MAX_HEAD_DIM",
           "attention_flops", "LOG2E"]
