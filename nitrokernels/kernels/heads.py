"""Triton kernels of the grouped discriminator-head stack (`nitrokernels.ops.head_stack`).

All sampled heads of ONE feature level run together, one layer depth per launch:

  forward   _conv_fwd_kernel    implicit-GEMM Conv4x4/s2/p1 for every sampled head (head on grid axis 2).
                                Layer 1 reads the SHARED feature (any strides) and gathers each head's
                                weights from the pooled [P, O, I, 4, 4] tensor by `ids` inside the kernel;
                                deeper layers read the previous layer's pre-norm output and apply
                                GroupNorm-normalise + affine + SiLU while loading (scale/shift per
                                (head, sample, channel)). Epilogue: + bias, store, and per-tile per-channel
                                GroupNorm partial statistics (tile mean and centred sum of squares).
            _final_fwd_kernel   the final conv (k = S_D: valid conv to one logit per sample; k = 1: a logit
                                per location) with the same fused input normalisation (a reduction, no GEMM).
  backward  _final_bwd_kernel   dLogits -> dA_D (elementwise), SiLU' -> dU_D, GroupNorm-backward partial
                                sums, final-weight gradient partials.
            _gn_bwd_apply_kernel  dY = alpha * dU + beta * Y + delta   (per (head, sample, channel) coefs)
            _conv_dgrad_kernel  data gradient of a Conv4x4/s2/p1, split by the parity of the input pixel so
                                only the 4 taps that touch it are multiplied. Deeper layers: per head, and the
                                epilogue is the GroupNorm+SiLU backward of the layer below (as in the final
                                kernel). Layer 1 (SHARED): the reduction runs over heads x taps x channels, so
                                the shared feature's gradient is summed over heads inside the GEMM, no atomics.
            _conv_wgrad_kernel  weight gradient per sampled head (one tap per grid column), reading the layer
                                input (shared feature, or the previous pre-norm output normalised on the fly),
                                written as the values [h, O, I, 4, 4] of the sparse pool gradient.

Activation layout: per head channels-last, [h, B, S, S, O] contiguous. Kept for backward: every layer's
pre-norm conv output Y_d (input dtype) and its GroupNorm mean / rstd ([h, B, G, 2], fp32). Everything else
(the normalised + SiLU activations, their derivatives) is recomputed where it is consumed.

Accumulation is fp32; fp32 inputs use IEEE fp32 dots unless torch's float32 matmul precision allows TF32.
Under TRITON_INTERPRET=1, half-precision operands are upcast to fp32 before tl.dot (the interpreter's
bf16 dot is wrong); the products are exact in fp32 so results are unchanged.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from nitrokernels.ops.dispatch import triton_interpreting

# ================================================================================================ kernels


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _silu_grad(u, sig):
    return sig * (1.0 + u * (1.0 - sig))


@triton.jit
def _load_head_id(ids_ptr, head, P):
    """Pool row of sampled head `head`, clamped into range (out-of-range ids poison outputs with NaN)."""
    pid = tl.load(ids_ptr + head).to(tl.int64)
    ok = (pid >= 0) & (pid < P)
    return tl.where(ok, pid, 0), ok


@triton.jit
def _conv_fwd_kernel(
    x_ptr, sx_head, sx_b, sx_h, sx_w, sx_c,            # layer input: shared feature (sx_head = 0) or Y_{d-1}
    scale_ptr, shift_ptr,                              # [h, B, I] fp32: GroupNorm affine of Y_{d-1} (NORM)
    w_ptr, sw_p, sw_o, sw_c, sw_kh, sw_kw,             # pooled weights [P, O, I, 4, 4]
    bias_ptr, sb_p, sb_o,                              # pooled bias [P, O]
    ids_ptr, P,                                        # pool rows of the sampled heads (bias, validity)
    wrow_ptr,                                          # weight rows (= ids, or arange for gathered weights)
    y_ptr,                                             # out: [h, B, S_out, S_out, O]
    part_ptr,                                          # out: [h, B, T, O, 2] fp32 (tile mean, tile M2)
    B, S_in, S_out, I, O, T,
    NORM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKC: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    head = tl.program_id(2)
    b = pid_m // T
    t = pid_m % T
    pid, id_ok = _load_head_id(ids_ptr, head, P)
    wrow = tl.where(id_ok, tl.load(wrow_ptr + head).to(tl.int64), 0)
    hb = (head * B + b).to(tl.int64)

    npix = S_out * S_out
    rows = t * BM + tl.arange(0, BM)
    row_ok = rows < npix
    oh = rows // S_out
    ow = rows % S_out
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < O

    x_base = x_ptr + head.to(tl.int64) * sx_head + b.to(tl.int64) * sx_b
    w_base = w_ptr + wrow * sw_p
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # One flat (channel chunk, tap) loop: a single set of pipelined operand buffers (an unrolled tap loop
    # would give every tl.dot its own shared-memory buffers).
    for kk in range(0, tl.cdiv(I, BKC) * 16):
        tap = kk % 16
        cs = (kk // 16) * BKC + tl.arange(0, BKC)
        c_ok = cs < I
        ih = 2 * oh - 1 + tap // 4
        iw = 2 * ow - 1 + tap % 4
        p_ok = row_ok & (ih >= 0) & (ih < S_in) & (iw >= 0) & (iw < S_in)
        m = p_ok[:, None] & c_ok[None, :]
        a = tl.load(x_base + ih[:, None] * sx_h + iw[:, None] * sx_w + cs[None, :] * sx_c, mask=m, other=0.0)
        if NORM:
            sc = tl.load(scale_ptr + hb * I + cs, mask=c_ok, other=0.0)
            sh = tl.load(shift_ptr + hb * I + cs, mask=c_ok, other=0.0)
            u = a.to(tl.float32) * sc[None, :] + sh[None, :]
            a = tl.where(m, u * tl.sigmoid(u), 0.0).to(w_ptr.dtype.element_ty)
        wt = tl.load(w_base + cols[None, :] * sw_o + cs[:, None] * sw_c + (tap // 4) * sw_kh + (tap % 4) * sw_kw,
                     mask=c_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, wt, acc, PREC, UPCAST)

    bias = tl.load(bias_ptr + pid * sb_p + cols * sb_o, mask=col_ok, other=0.0).to(tl.float32)
    acc = acc + bias[None, :]
    acc = tl.where(id_ok, acc, float("nan"))
    yv = acc.to(y_ptr.dtype.element_ty)
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(y_ptr + hb * npix * O + rows[:, None] * O + cols[None, :], yv, mask=out_mask)

    # GroupNorm partial statistics of the stored (rounded) values, per channel: tile mean and centred M2.
    yf = tl.where(row_ok[:, None], yv.to(tl.float32), 0.0)
    n = tl.minimum(npix - t * BM, BM).to(tl.float32)
    tmean = tl.sum(yf, axis=0) / n
    dev = tl.where(row_ok[:, None], yf - tmean[None, :], 0.0)
    m2 = tl.sum(dev * dev, axis=0)
    pbase = part_ptr + (hb * T + t) * O * 2 + cols * 2
    tl.store(pbase, tmean, mask=col_ok)
    tl.store(pbase + 1, m2, mask=col_ok)


@triton.jit
def _final_fwd_kernel(
    y_ptr, scale_ptr, shift_ptr,                       # Y_D [h, B, S, S, I], affine [h, B, I] fp32
    w_ptr, sw_p, sw_c, sw_kh, sw_kw,                   # pooled final weight [P, 1, I, K, K]
    bias_ptr, sb_p,                                    # pooled final bias [P, 1]
    ids_ptr, P,
    out_ptr,                                           # [h, B] (GLOBAL) or [h, B, S, S]
    B, S, I,
    GLOBAL: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
):
    """GLOBAL: K == S, valid conv to 1x1 -> tap index == pixel: z = sum_{q,c} a[q, c] * w[c, q] (T == 1).
    Local (K == 1): z[q] = sum_c a[q, c] * w[c]."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    head = tl.program_id(2)
    pid, id_ok = _load_head_id(ids_ptr, head, P)
    hb = (head * B + b).to(tl.int64)
    npix = S * S
    q = pid_p * BP + tl.arange(0, BP)
    q_ok = q < npix
    acc = tl.zeros((BP, BC), dtype=tl.float32)
    for c0 in range(0, I, BC):
        cs = c0 + tl.arange(0, BC)
        c_ok = cs < I
        m = q_ok[:, None] & c_ok[None, :]
        sc = tl.load(scale_ptr + hb * I + cs, mask=c_ok, other=0.0)
        sh = tl.load(shift_ptr + hb * I + cs, mask=c_ok, other=0.0)
        yv = tl.load(y_ptr + hb * npix * I + q[:, None] * I + cs[None, :], mask=m, other=0.0).to(tl.float32)
        u = yv * sc[None, :] + sh[None, :]
        a = tl.where(m, (u * tl.sigmoid(u)).to(y_ptr.dtype.element_ty).to(tl.float32), 0.0)
        if GLOBAL:
            wv = tl.load(w_ptr + pid * sw_p + cs[None, :] * sw_c + (q // S)[:, None] * sw_kh + (q % S)[:, None] * sw_kw,
                         mask=m, other=0.0).to(tl.float32)
            acc += a * wv
        else:
            wv = tl.load(w_ptr + pid * sw_p + cs * sw_c, mask=c_ok, other=0.0).to(tl.float32)
            acc += a * wv[None, :]
    bias = tl.load(bias_ptr + pid * sb_p).to(tl.float32)
    if GLOBAL:
        z = tl.sum(tl.sum(acc, axis=1), axis=0) + bias
        z = tl.where(id_ok, z, float("nan"))
        tl.store(out_ptr + hb, z.to(out_ptr.dtype.element_ty))
    else:
        z = tl.sum(acc, axis=1) + bias
        z = tl.where(id_ok, z, float("nan"))
        tl.store(out_ptr + hb * npix + q, z.to(out_ptr.dtype.element_ty), mask=q_ok)


@triton.jit
def _final_bwd_kernel(
    gz_ptr,                                            # dLogits [h, B] (GLOBAL) or [h, B, S, S] (local)
    y_ptr, scale_ptr, shift_ptr, stats_ptr,            # Y_D [h, B, S, S, I], affine, (mean, rstd) [h, B, G, 2]
    w_ptr, sw_p, sw_c, sw_kh, sw_kw,                   # pooled final weight [P, 1, I, K, K]
    ids_ptr, P,
    gu_ptr,                                            # out: dU_D [h, B, S, S, I] (grad wrt GroupNorm output)
    part_ptr,                                          # out: [h, B, T, I, 3] fp32 (sum dU, sum dU*xhat, sum Y)
    gwp_ptr,                                           # out: final-weight grad partials, see below
    B, S, I, T, G, CPG,
    GLOBAL: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    head = tl.program_id(2)
    pid, id_ok = _load_head_id(ids_ptr, head, P)
    hb = (head * B + b).to(tl.int64)
    npix = S * S
    q = pid_t * BQ + tl.arange(0, BQ)
    q_ok = q < npix
    if GLOBAL:
        gz = tl.load(gz_ptr + hb).to(tl.float32)
    else:
        gz = tl.load(gz_ptr + hb * npix + q, mask=q_ok, other=0.0).to(tl.float32)
    for c0 in range(0, I, BC):
        cs = c0 + tl.arange(0, BC)
        c_ok = cs < I
        m = q_ok[:, None] & c_ok[None, :]
        sc = tl.load(scale_ptr + hb * I + cs, mask=c_ok, other=0.0)
        sh = tl.load(shift_ptr + hb * I + cs, mask=c_ok, other=0.0)
        grp = cs // CPG
        mean = tl.load(stats_ptr + (hb * G + grp) * 2, mask=c_ok, other=0.0)
        rstd = tl.load(stats_ptr + (hb * G + grp) * 2 + 1, mask=c_ok, other=0.0)
        offs = hb * npix * I + q[:, None] * I + cs[None, :]
        yv = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
        u = yv * sc[None, :] + sh[None, :]
        sig = tl.sigmoid(u)
        if GLOBAL:   # valid conv to 1x1: tap index == input pixel
            wv = tl.load(w_ptr + pid * sw_p + cs[None, :] * sw_c + (q // S)[:, None] * sw_kh + (q % S)[:, None] * sw_kw,
                         mask=m, other=0.0).to(tl.float32)
            ga = gz * wv
        else:        # 1x1 conv
            wv = tl.load(w_ptr + pid * sw_p + cs * sw_c, mask=c_ok, other=0.0).to(tl.float32)
            ga = gz[:, None] * wv[None, :]
        ga = ga.to(y_ptr.dtype.element_ty).to(tl.float32)
        gu = tl.where(m, ga * _silu_grad(u, sig), 0.0)
        gu = tl.where(id_ok, gu, float("nan"))
        gur = gu.to(gu_ptr.dtype.element_ty)
        tl.store(gu_ptr + offs, gur, mask=m)
        gu = tl.where(m, gur.to(tl.float32), 0.0)
        xhat = (yv - mean[None, :]) * rstd[None, :]
        pbase = part_ptr + (hb * T + pid_t) * I * 3 + cs * 3
        tl.store(pbase, tl.sum(gu, axis=0), mask=c_ok)
        tl.store(pbase + 1, tl.sum(tl.where(m, gu * xhat, 0.0), axis=0), mask=c_ok)
        tl.store(pbase + 2, tl.sum(yv, axis=0), mask=c_ok)
        a = tl.where(m, (u * sig).to(y_ptr.dtype.element_ty).to(tl.float32), 0.0)
        if GLOBAL:   # gwp [h, B, I, S*S]: dW[c, tap] for this sample (T == 1)
            tl.store(gwp_ptr + hb * I * npix + cs[None, :] * npix + q[:, None], gz * a, mask=m)
        else:        # gwp [h, B*T, I]: sum over this tile's pixels
            tl.store(gwp_ptr + (hb * T + pid_t) * I + cs, tl.sum(gz[:, None] * a, axis=0), mask=c_ok)


@triton.jit
def _gn_bwd_apply_kernel(g_ptr, y_ptr, coef_ptr, npix, I, BQ: tl.constexpr, BC: tl.constexpr):
    """In place: dY = alpha * dU + beta * Y + delta (GroupNorm backward, coefficients per (head, sample, channel))."""
    pid_q = tl.program_id(0)
    pid_c = tl.program_id(1)
    hb = tl.program_id(2).to(tl.int64)
    q = pid_q * BQ + tl.arange(0, BQ)
    cs = pid_c * BC + tl.arange(0, BC)
    c_ok = cs < I
    m = (q < npix)[:, None] & c_ok[None, :]
    offs = hb * npix * I + q[:, None] * I + cs[None, :]
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
    cb = coef_ptr + (hb * I + cs) * 3
    al = tl.load(cb, mask=c_ok, other=0.0)
    be = tl.load(cb + 1, mask=c_ok, other=0.0)
    de = tl.load(cb + 2, mask=c_ok, other=0.0)
    out = al[None, :] * g + be[None, :] * y + de[None, :]
    tl.store(g_ptr + offs, out.to(g_ptr.dtype.element_ty), mask=m)


@triton.jit
def _conv_dgrad_kernel(
    gy_ptr,                                            # dY_d [h, B, S_out, S_out, O]
    w_ptr, sw_p, sw_o, sw_c, sw_kh, sw_kw,             # pooled weights [P, O, I, 4, 4]
    ids_ptr, P,
    out_ptr, so_b, so_h, so_w, so_c,                   # SHARED: dFeature (any strides); else dU_{d-1} [h,B,S,S,I]
    y_ptr, scale_ptr, shift_ptr, stats_ptr, part_ptr,  # (not SHARED) layer d-1: Y, affine, stats, partials
    B, S_in, S_out, I, O, H, T, G, CPG,
    SHARED: tl.constexpr, CLASSES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKO: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    t = pid_m % T
    ncls = 4 // CLASSES
    cls0 = ((pid_m // T) % ncls) * CLASSES
    b = pid_m // (ncls * T)
    for cls in range(cls0, cls0 + CLASSES):   # CLASSES input-pixel parity classes per program
        _dgrad_class(gy_ptr, w_ptr, sw_p, sw_o, sw_c, sw_kh, sw_kw, ids_ptr, P, out_ptr, so_b, so_h, so_w, so_c,
                     y_ptr, scale_ptr, shift_ptr, stats_ptr, part_ptr, B, S_in, S_out, I, O, H, T, G, CPG,
                     b, cls, t, SHARED, BM, BN, BKO, PREC, UPCAST)


@triton.jit
def _dgrad_class(gy_ptr, w_ptr, sw_p, sw_o, sw_c, sw_kh, sw_kw, ids_ptr, P, out_ptr, so_b, so_h, so_w, so_c,
                 y_ptr, scale_ptr, shift_ptr, stats_ptr, part_ptr, B, S_in, S_out, I, O, H, T, G, CPG,
                 b, cls, t, SHARED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKO: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(1)
    head = tl.program_id(2)
    ph = cls // 2
    pw = cls % 2
    hc = (S_in + 1) // 2
    r = t * BM + tl.arange(0, BM)
    qh = 2 * (r // hc) + ph
    qw = 2 * (r % hc) + pw
    row_ok = (r < hc * hc) & (qh < S_in) & (qw < S_in)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < I
    npo = S_out * S_out

    if SHARED:
        h_lo = 0
        h_hi = H
    else:
        h_lo = head
        h_hi = head + 1
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for hh in range(h_lo, h_hi):
        pid, id_ok = _load_head_id(ids_ptr, hh, P)
        gy_base = gy_ptr + (hh * B + b).to(tl.int64) * npo * O
        w_base = w_ptr + pid * sw_p
        for kk in range(0, tl.cdiv(O, BKO) * 4):     # flat (output-channel chunk, tap of this parity) loop
            j = kk % 4
            os_ = (kk // 4) * BKO + tl.arange(0, BKO)
            o_ok = os_ < O
            kh = 1 - ph + 2 * (j // 2)              # the two kernel rows / columns with the right parity
            kw = 1 - pw + 2 * (j % 2)
            nh = qh + 1 - kh                        # = 2 * oh (even by construction)
            nw = qw + 1 - kw
            oh = nh // 2
            ow = nw // 2
            p_ok = row_ok & (nh >= 0) & (nw >= 0) & (oh < S_out) & (ow < S_out)
            a = tl.load(gy_base + (oh * S_out + ow)[:, None] * O + os_[None, :],
                        mask=p_ok[:, None] & o_ok[None, :], other=0.0)
            wt = tl.load(w_base + os_[:, None] * sw_o + cols[None, :] * sw_c + kh * sw_kh + kw * sw_kw,
                         mask=o_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _mma(a, wt, acc, PREC, UPCAST)
        acc = tl.where(id_ok, acc, float("nan"))

    m = row_ok[:, None] & col_ok[None, :]
    if SHARED:
        tl.store(out_ptr + b.to(tl.int64) * so_b + qh[:, None] * so_h + qw[:, None] * so_w + cols[None, :] * so_c,
                 acc.to(out_ptr.dtype.element_ty), mask=m)
    else:
        # GroupNorm + SiLU backward of layer d-1, up to the group reductions (done by the host, tiny).
        hb = (head * B + b).to(tl.int64)
        ga = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        offs = hb * S_in * S_in * I + (qh * S_in + qw)[:, None] * I + cols[None, :]
        yv = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + hb * I + cols, mask=col_ok, other=0.0)
        sh = tl.load(shift_ptr + hb * I + cols, mask=col_ok, other=0.0)
        grp = cols // CPG
        mean = tl.load(stats_ptr + (hb * G + grp) * 2, mask=col_ok, other=0.0)
        rstd = tl.load(stats_ptr + (hb * G + grp) * 2 + 1, mask=col_ok, other=0.0)
        u = yv * sc[None, :] + sh[None, :]
        gu = tl.where(m, ga * _silu_grad(u, tl.sigmoid(u)), 0.0)
        gur = gu.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, gur, mask=m)
        gu = tl.where(m, gur.to(tl.float32), 0.0)
        xhat = (yv - mean[None, :]) * rstd[None, :]
        pbase = part_ptr + (hb * 4 * T + cls * T + t) * I * 3 + cols * 3
        tl.store(pbase, tl.sum(gu, axis=0), mask=col_ok)
        tl.store(pbase + 1, tl.sum(tl.where(m, gu * xhat, 0.0), axis=0), mask=col_ok)
        tl.store(pbase + 2, tl.sum(yv, axis=0), mask=col_ok)


@triton.jit
def _conv_wgrad_kernel(
    gy_ptr,                                            # dY_d [h, B, S_out, S_out, O]
    x_ptr, sx_head, sx_b, sx_h, sx_w, sx_c,            # layer input (shared feature: sx_head = 0, or Y_{d-1})
    scale_ptr, shift_ptr,                              # [h, B, I] fp32 (NORM)
    gw_ptr,                                            # out: [h, O, I, 4, 4] contiguous (sparse-grad values)
    B, S_in, S_out, I, O, NC,
    NORM: tl.constexpr, TAPS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid0 = tl.program_id(0)
    head = tl.program_id(2)
    pid_o = pid0 // NC
    pid_c = pid0 % NC
    os_ = pid_o * BM + tl.arange(0, BM)
    o_ok = os_ < O
    cs = pid_c * BN + tl.arange(0, BN)
    c_ok = cs < I
    npo = S_out * S_out
    for tap in range(tl.program_id(1) * TAPS, tl.program_id(1) * TAPS + TAPS):   # TAPS taps per program
        _wgrad_tap(gy_ptr, x_ptr, sx_head, sx_b, sx_h, sx_w, sx_c, scale_ptr, shift_ptr, gw_ptr,
                   B, S_in, S_out, I, O, head, tap, os_, o_ok, cs, c_ok, npo, NORM, BM, BN, BK, PREC, UPCAST)


@triton.jit
def _wgrad_tap(gy_ptr, x_ptr, sx_head, sx_b, sx_h, sx_w, sx_c, scale_ptr, shift_ptr, gw_ptr,
               B, S_in, S_out, I, O, head, tap, os_, o_ok, cs, c_ok, npo,
               NORM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr):
    kh = tap // 4
    kw = tap % 4
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for b in range(B):
        hb = (head * B + b).to(tl.int64)
        gy_base = gy_ptr + hb * npo * O
        x_base = x_ptr + head.to(tl.int64) * sx_head + (hb - head.to(tl.int64) * B) * sx_b
        if NORM:
            sc = tl.load(scale_ptr + hb * I + cs, mask=c_ok, other=0.0)
            sh = tl.load(shift_ptr + hb * I + cs, mask=c_ok, other=0.0)
        for p0 in range(0, npo, BK):
            ps = p0 + tl.arange(0, BK)
            p_ok = ps < npo
            ih = 2 * (ps // S_out) - 1 + kh
            iw = 2 * (ps % S_out) - 1 + kw
            x_ok = p_ok & (ih >= 0) & (ih < S_in) & (iw >= 0) & (iw < S_in)
            g = tl.load(gy_base + ps[None, :] * O + os_[:, None], mask=o_ok[:, None] & p_ok[None, :], other=0.0)
            mx = x_ok[:, None] & c_ok[None, :]
            a = tl.load(x_base + ih[:, None] * sx_h + iw[:, None] * sx_w + cs[None, :] * sx_c, mask=mx, other=0.0)
            if NORM:
                u = a.to(tl.float32) * sc[None, :] + sh[None, :]
                a = tl.where(mx, u * tl.sigmoid(u), 0.0).to(gy_ptr.dtype.element_ty)
            acc = _mma(g, a, acc, PREC, UPCAST)
    out = gw_ptr + head.to(tl.int64) * O * I * 16 + os_[:, None] * (I * 16) + cs[None, :] * 16 + tap
    tl.store(out, acc.to(gw_ptr.dtype.element_ty), mask=o_ok[:, None] & c_ok[None, :])


# ============================================================================================ host side


# Upper limits of the block sizes (each block is also cut down to the problem size, never below 16).
# GPU values are a reasonable default for Hopper/Ampere (untuned). The interpreter runs one program at a
# time with a per-operation overhead, so it gets larger blocks (fewer programs / loop trips).
# Tests set BLOCK_OVERRIDE to small values to exercise the multi-tile paths (stats combination, K loops).
GPU_BLOCKS = dict(fwd_m=128, fwd_n=128, fwd_kc=32, fin_p=64, fin_c=64, dg_m=128, dg_n=128, dg_n_epi=64, dg_ko=32,
                  dg_classes=1, wg_m=128, wg_n=128, wg_k=64, wg_taps=1, ew_q=64, ew_c=128)
INTERPRETER_BLOCKS = dict(fwd_m=256, fwd_n=128, fwd_kc=64, fin_p=256, fin_c=128, dg_m=256, dg_n=128, dg_n_epi=128,
                          dg_ko=64,
                          dg_classes=4, wg_m=128, wg_n=128, wg_k=1024, wg_taps=16, ew_q=1024, ew_c=128)
# fp32 dots run on FMA units (IEEE) with fp32 operands: smaller tiles keep them out of register spills.
GPU_FP32_BLOCKS = dict(GPU_BLOCKS, fwd_m=64, fwd_n=64, fwd_kc=16, dg_m=64, dg_n=64, dg_n_epi=64, dg_ko=16,
                       wg_m=64, wg_n=64, wg_k=16)
BLOCK_OVERRIDE: dict[str, int] = {}
_DTYPE = [torch.bfloat16]      # dtype of the launch being configured (set by the host functions)


def _cap(name: str) -> int:
    if name in BLOCK_OVERRIDE:
        return BLOCK_OVERRIDE[name]
    if triton_interpreting():
        return INTERPRETER_BLOCKS[name]
    return (GPU_FP32_BLOCKS if _DTYPE[0] == torch.float32 else GPU_BLOCKS)[name]


def weight_source() -> str:
    """Where the conv kernels read weights from (NITROKERNELS_HEADS_WEIGHTS, read per call):

    "pool"     (default) straight from the pooled [P, O, I, 4, 4] tensors, each head's rows gathered by id
               inside the kernel; no copy. The GEMM operand is then a stride-16 gather (2-byte loads).
    "gathered" per launch, the sampled heads' weights are first copied into [h, 4, 4, I, O] (contiguous
               along the GEMM's N / K dims, 16-byte loads); costs one read + write of the sampled weights
               and that much transient memory. Same kernels (they take any weight strides).
    """
    source = os.environ.get("NITROKERNELS_HEADS_WEIGHTS", "pool")
    if source not in ("pool", "gathered"):
        raise ValueError(f"NITROKERNELS_HEADS_WEIGHTS must be 'pool' or 'gathered', got {source!r}")
    return source


def _conv_weights(w: torch.Tensor, ids: torch.Tensor, ids_c: torch.Tensor, arange: torch.Tensor):
    """(weights indexed [row, O, I, kh, kw], row ids) for the conv kernels, per `weight_source()`."""
    if weight_source() == "pool":
        return w, ids
    gathered = w.index_select(0, ids_c).permute(0, 3, 4, 2, 1).contiguous()   # [h, 4, 4, I, O]
    return gathered.permute(0, 4, 3, 1, 2), arange


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """The shared feature in channels-last memory (contiguous channel loads); no copy if it already is."""
    return x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous(memory_format=torch.channels_last)


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _clamp_block(n: int, lo: int, name: str) -> int:
    return max(lo, min(_cap(name), _np2(n)))


def _dot_mode(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast-to-fp32-before-dot) for tl.dot."""
    interp = triton_interpreting()
    if dtype == torch.float32:
        tf32 = (not interp) and torch.get_float32_matmul_precision() != "highest"
        return ("tf32" if tf32 else "ieee"), False
    return "tf32", interp            # Triton's default; ignored for 16-bit operands


def _warps(bm: int, bn: int) -> int:
    return 8 if bm * bn >= 128 * 64 else 4


def _strides_bhwc(x: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of an NCHW-indexed tensor in (b, h, w, c) order (works for any memory layout)."""
    return x.stride(0), x.stride(2), x.stride(3), x.stride(1)


def _w_strides(w: torch.Tensor) -> tuple[int, ...]:
    return tuple(w.stride())                                   # (p, o, c, kh, kw)


def _scale_shift(stats: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor):
    """GroupNorm affine folded per (head, sample, channel): a = silu(y * scale + shift). fp32 [h, B, O]."""
    h, batch, groups, _ = stats.shape
    cpg = gamma.shape[1] // groups
    mean, rstd = stats[..., 0:1], stats[..., 1:2]                           # [h, B, G, 1]
    scale = rstd * gamma.view(h, 1, groups, cpg)                            # [h, B, G, cpg]
    shift = beta.view(h, 1, groups, cpg) - mean * scale
    return scale.reshape(h, batch, -1).contiguous(), shift.reshape(h, batch, -1).contiguous()


def _finish_stats(part: torch.Tensor, npix: int, block: int, groups: int, eps: float) -> torch.Tensor:
    """Combine per-tile (mean, M2) partials [h, B, T, O, 2] into GroupNorm (mean, rstd) [h, B, G, 2] (Chan)."""
    h, batch, tiles, channels, _ = part.shape
    cpg = channels // groups
    counts = (npix - torch.arange(tiles, device=part.device, dtype=torch.float32) * block).clamp(max=block)
    n = counts.view(1, 1, tiles, 1, 1)
    tmean = part[..., 0].reshape(h, batch, tiles, groups, cpg)
    tm2 = part[..., 1].reshape(h, batch, tiles, groups, cpg)
    total = float(npix * cpg)
    mean = (tmean * n).sum((2, 4)) / total
    m2 = tm2.sum((2, 4)) + (n * (tmean - mean[:, :, None, :, None]).square()).sum((2, 4))
    rstd = torch.rsqrt(m2 / total + eps)
    return torch.stack((mean, rstd), -1)


def _gn_bwd_coefs(part: torch.Tensor, stats: torch.Tensor, gamma: torch.Tensor, npix: int):
    """From per-tile (sum dU, sum dU*xhat, sum Y) partials [h, B, T, I, 3]: the coefficients of
    dY = alpha*dU + beta*Y + delta ([h, B, I, 3] fp32), the per-head affine gradients and the gradient of
    the conv bias that produced Y, sum(dY) = alpha*sum(dU) + beta*sum(Y) + delta*npix ([h, I] fp32 each).
    (The bias gradient from these fp32 sums avoids summing the rounded dY, which cancels heavily: dY sums
    to zero over every group.)"""
    h, batch, _, channels, _ = part.shape
    groups = stats.shape[2]
    cpg = channels // groups
    sums = part.sum(2)                                                      # [h, B, I, 2]
    p1, p2, p3 = sums[..., 0], sums[..., 1], sums[..., 2]
    g_beta, g_gamma = p1.sum(1), p2.sum(1)                                  # [h, I]
    n = float(npix * cpg)
    c1 = (gamma[:, None] * p1).view(h, batch, groups, cpg).sum(-1) / n      # mean of dxhat
    c2 = (gamma[:, None] * p2).view(h, batch, groups, cpg).sum(-1) / n      # mean of dxhat * xhat
    mean, rstd = stats[..., 0], stats[..., 1]                               # [h, B, G]
    alpha = rstd[..., None] * gamma.view(h, 1, groups, cpg)                 # [h, B, G, cpg]
    beta = (-rstd * rstd * c2)[..., None].expand_as(alpha)
    delta = (rstd * rstd * c2 * mean - rstd * c1)[..., None].expand_as(alpha)
    coef = torch.stack((alpha, beta, delta), -1).reshape(h, batch, channels, 3).contiguous()
    g_bias = (coef[..., 0] * p1 + coef[..., 1] * p3 + coef[..., 2] * npix).sum(1)
    return coef, g_gamma, g_beta, g_bias


def _gn_bwd_apply(g: torch.Tensor, y: torch.Tensor, coef: torch.Tensor) -> None:
    h, batch, s, _, channels = g.shape
    npix = s * s
    bq = _clamp_block(npix, 16, "ew_q")
    bc = _clamp_block(channels, 16, "ew_c")
    grid = (triton.cdiv(npix, bq), triton.cdiv(channels, bc), h * batch)
    _gn_bwd_apply_kernel[grid](g, y, coef, npix, channels, BQ=bq, BC=bc, num_warps=4)


def head_stack_forward(feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight, final_bias,
                       ids, num_groups, eps):
    """Forward of all sampled heads of one level. Returns (logits, [Y_d], [stats_d]) (see module doc).

    Inputs are validated by the caller (ops.heads); `ids` may be int32 or int64 on the feature's device.
    """
    h = ids.numel()
    batch, channels, size, _ = feature.shape
    dtype, device = feature.dtype, feature.device
    prec, upcast = _dot_mode(dtype)
    _DTYPE[0] = dtype
    pool = conv_weights[0].shape[0]
    ids_c = ids.long().clamp(0, pool - 1)
    arange = torch.arange(h, device=device)

    x = _channels_last(feature)
    sx, sx_head = _strides_bhwc(x), 0
    scale = shift = feature                      # placeholders while the input is the raw feature
    s_in, c_in = size, channels
    ys, stats = [], []
    for d, (w, bias) in enumerate(zip(conv_weights, conv_biases)):
        c_out = w.shape[1]
        s_out = s_in // 2
        npix = s_out * s_out
        bm = _clamp_block(npix, 16, "fwd_m")
        bn = _clamp_block(c_out, 16, "fwd_n")
        bkc = _clamp_block(c_in, 16, "fwd_kc")
        tiles = triton.cdiv(npix, bm)
        y = torch.empty((h, batch, s_out, s_out, c_out), dtype=dtype, device=device)
        part = torch.empty((h, batch, tiles, c_out, 2), dtype=torch.float32, device=device)
        grid = (batch * tiles, triton.cdiv(c_out, bn), h)
        wk, wids = _conv_weights(w, ids, ids_c, arange)
        _conv_fwd_kernel[grid](
            x, sx_head, *sx, scale, shift, wk, *_w_strides(wk), bias, bias.stride(0), bias.stride(1), ids, pool, wids,
            y, part, batch, s_in, s_out, c_in, c_out, tiles,
            NORM=d > 0, BM=bm, BN=bn, BKC=bkc, PREC=prec, UPCAST=upcast, num_warps=_warps(bm, bn), num_stages=3)
        st = _finish_stats(part, npix, bm, num_groups, eps)
        ys.append(y)
        stats.append(st)
        scale, shift = _scale_shift(st, norm_weights[d].index_select(0, ids_c).float(),
                                    norm_biases[d].index_select(0, ids_c).float())
        x, sx_head, sx = y, y.stride(0), (y.stride(1), y.stride(2), y.stride(3), y.stride(4))
        s_in, c_in = s_out, c_out

    k = final_weight.shape[-1]
    is_global = k != 1                      # validated: a global head's map is exactly k x k
    out = torch.empty((h, batch) if is_global else (h, batch, s_in, s_in), dtype=dtype, device=device)
    npix = s_in * s_in
    bp = _np2(npix) if is_global else _clamp_block(npix, 16, "fin_p")
    bc = _clamp_block(c_in, 16, "fin_c")
    _final_fwd_kernel[(triton.cdiv(npix, bp), batch, h)](
        ys[-1], scale, shift, final_weight, final_weight.stride(0), final_weight.stride(2), final_weight.stride(3),
        final_weight.stride(4), final_bias, final_bias.stride(0), ids, pool, out, batch, s_in, c_in,
        GLOBAL=is_global, BP=bp, BC=bc, num_warps=4)
    return out, ys, stats


def head_stack_backward(grad_out, feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight,
                        final_bias, ids, ys, stats, num_groups, eps, need_feature_grad=True, need_param_grads=True):
    """Backward of `head_stack_forward` from its saved (Y_d, stats_d).

    Returns (d_feature or None, [dW_d values [h, O, I, 4, 4]], [db_d [h, O]], [dgamma_d], [dbeta_d],
    dW_final [h, 1, I, k, k], db_final [h, 1]); parameter gradients are None when not needed.
    """
    h = ids.numel()
    batch, channels, size, _ = feature.shape
    dtype, device = feature.dtype, feature.device
    prec, upcast = _dot_mode(dtype)
    _DTYPE[0] = dtype
    pool = conv_weights[0].shape[0]
    ids_c = ids.long().clamp(0, pool - 1)
    arange = torch.arange(h, device=device)
    depth = len(conv_weights)
    grad_out = grad_out.contiguous()

    gammas = [g.index_select(0, ids_c).float() for g in norm_weights]
    betas = [b.index_select(0, ids_c).float() for b in norm_biases]
    affine = [_scale_shift(st, g, b) for st, g, b in zip(stats, gammas, betas)]
    g_w = [None] * depth
    g_b = [None] * depth
    g_gamma = [None] * depth
    g_beta = [None] * depth

    # ---- final conv and the GroupNorm + SiLU of the last layer
    y_last = ys[-1]
    s_last, c_last = y_last.shape[2], y_last.shape[4]
    npix = s_last * s_last
    k = final_weight.shape[-1]
    is_global = k != 1
    bq = _np2(npix) if is_global else _clamp_block(npix, 16, "fin_p")
    bc = _clamp_block(c_last, 16, "fin_c")
    tiles = triton.cdiv(npix, bq)
    gu = torch.empty_like(y_last)
    part = torch.empty((h, batch, tiles, c_last, 3), dtype=torch.float32, device=device)
    gwp = torch.empty((h, batch, c_last, npix) if is_global else (h, batch * tiles, c_last),
                      dtype=torch.float32, device=device)
    _final_bwd_kernel[(tiles, batch, h)](
        grad_out, y_last, affine[-1][0], affine[-1][1], stats[-1], final_weight, final_weight.stride(0),
        final_weight.stride(2), final_weight.stride(3), final_weight.stride(4), ids, pool, gu, part, gwp,
        batch, s_last, c_last, tiles, num_groups, c_last // num_groups,
        GLOBAL=is_global, BQ=bq, BC=bc, num_warps=4)
    g_wf = g_bf = None
    if need_param_grads:
        g_wf = gwp.sum(1).view(h, 1, c_last, k, k).to(final_weight.dtype)
        g_bf = grad_out.float().reshape(h, -1).sum(1, keepdim=True).to(final_bias.dtype)
    coef, g_gamma[-1], g_beta[-1], g_b[-1] = _gn_bwd_coefs(part, stats[-1], gammas[-1], npix)
    _gn_bwd_apply(gu, y_last, coef)
    gy = gu                                                     # dY of layer depth-1

    # ---- conv layers, last to first
    g_feature = None
    for d in range(depth - 1, -1, -1):
        w = conv_weights[d]
        c_out, c_in = w.shape[1], w.shape[2]
        s_out = gy.shape[2]
        s_in = size if d == 0 else ys[d - 1].shape[2]
        if d == 0:
            x = _channels_last(feature) if need_param_grads else feature
            sx_head, sx = 0, _strides_bhwc(x)
            scale = shift = x
        else:
            x = ys[d - 1]
            sx_head, sx = x.stride(0), (x.stride(1), x.stride(2), x.stride(3), x.stride(4))
            scale, shift = affine[d - 1]
        if need_param_grads:
            bm = _clamp_block(c_out, 16, "wg_m")
            bn = _clamp_block(c_in, 16, "wg_n")
            bk = _clamp_block(s_out * s_out, 16, "wg_k")
            nc = triton.cdiv(c_in, bn)
            gw = torch.empty((h, c_out, c_in, 4, 4), dtype=w.dtype, device=device)
            taps = _cap("wg_taps")
            _conv_wgrad_kernel[(triton.cdiv(c_out, bm) * nc, 16 // taps, h)](
                gy, x, sx_head, *sx, scale, shift, gw, batch, s_in, s_out, c_in, c_out, nc,
                NORM=d > 0, TAPS=taps, BM=bm, BN=bn, BK=bk, PREC=prec, UPCAST=upcast, num_warps=_warps(bm, bn), num_stages=3)
            g_w[d] = gw
        if d == 0 and not need_feature_grad:
            break
        hc = (s_in + 1) // 2
        bm = _clamp_block(hc * hc, 16, "dg_m")
        bn = _clamp_block(c_in, 16, "dg_n" if d == 0 else "dg_n_epi")
        bko = _clamp_block(c_out, 16, "dg_ko")
        tiles = triton.cdiv(hc * hc, bm)
        classes = _cap("dg_classes")
        grid = (batch * (4 // classes) * tiles, triton.cdiv(c_in, bn), 1 if d == 0 else h)
        wk, wids = _conv_weights(w, ids, ids_c, arange)
        if d == 0:   # computed channels-last (contiguous stores), returned in the feature's layout
            g_feature = torch.empty_like(feature, memory_format=torch.channels_last)
            _conv_dgrad_kernel[grid](
                gy, wk, *_w_strides(wk), wids, wk.shape[0], g_feature, *_strides_bhwc(g_feature),
                gy, gy, gy, gy, gy, batch, s_in, s_out, c_in, c_out, h, tiles, 1, 1,
                SHARED=True, CLASSES=classes, BM=bm, BN=bn, BKO=bko, PREC=prec, UPCAST=upcast, num_warps=_warps(bm, bn), num_stages=3)
        else:
            y_prev = ys[d - 1]
            gu = torch.empty_like(y_prev)
            part = torch.empty((h, batch, 4 * tiles, c_in, 3), dtype=torch.float32, device=device)
            _conv_dgrad_kernel[grid](
                gy, wk, *_w_strides(wk), wids, wk.shape[0], gu, 0, 0, 0, 0,
                y_prev, scale, shift, stats[d - 1], part, batch, s_in, s_out, c_in, c_out, h, tiles,
                num_groups, c_in // num_groups,
                SHARED=False, CLASSES=classes, BM=bm, BN=bn, BKO=bko, PREC=prec, UPCAST=upcast, num_warps=_warps(bm, bn), num_stages=3)
            coef, g_gamma[d - 1], g_beta[d - 1], g_b[d - 1] = _gn_bwd_coefs(part, stats[d - 1], gammas[d - 1],
                                                                             s_in * s_in)
            _gn_bwd_apply(gu, y_prev, coef)
            gy = gu

    if need_param_grads:
        g_gamma = [g.to(p.dtype) for g, p in zip(g_gamma, norm_weights)]
        g_beta = [g.to(p.dtype) for g, p in zip(g_beta, norm_biases)]
        g_b = [g.to(p.dtype) for g, p in zip(g_b, conv_biases)]
    else:
        g_gamma, g_beta, g_b = [None] * depth, [None] * depth, [None] * depth
    if g_feature is not None and not feature.is_contiguous(memory_format=torch.channels_last):
        g_feature = torch.empty_like(feature).copy_(g_feature)     # the contract: the feature's layout
    return g_feature, g_w, g_b, g_gamma, g_beta, g_wf, g_bf
