"""Triton kernels of the grouped discriminator heads (`nitrokernels.ops.head_levels` / `head_stack`).

All sampled heads of ALL feature levels run together, one launch per kernel type per layer depth (the
10-level SDXL pool, depths 5/4/3: 15 launches forward, 25 backward, whatever the level count):

  forward   _conv_fwd_kernel    implicit-GEMM Conv4x4/s2/p1 for every sampled head of every level that is at
                                least d+1 layers deep. Layer 1 reads the level's SHARED channels-last feature,
                                deeper layers the materialised activation of the layer below; each head's
                                weights are read by pool row from the pool's GEMM-layout storage
                                [P, 4, 4, I, O] (output channels contiguous: 16-byte async copies). Tiles
                                128 x 256 (one head's 256 channels) x K 64 on the GPU. Epilogue: + bias, store,
                                per-tile per-channel GroupNorm partials (count, tile mean, centred M2).
            _gn_fwd_finish_kernel  combines the partials into GroupNorm (mean, rstd) and the folded affine
                                (scale, shift) per (head, sample, channel), gamma / beta gathered by id.
            _norm_silu_kernel   a_d = silu(y_d * scale + shift) ONCE per layer, in the compute dtype (the next
                                layer's input: no MUFU work in the GEMMs' operand loads).
            _final_fwd_kernel   the final conv of every level (k = S_D: valid conv to one logit per sample;
                                k = 1: a logit per location) with the input normalisation fused (small).
  backward  _final_bwd_kernel   dLogits -> dA_D, SiLU' -> dU_D, GroupNorm-backward partial sums, final-weight
                                gradient partials (every level at once, each at its own last depth).
            _gn_bwd_finish_kernel  the GroupNorm backward coefficients and the gamma / beta / conv-bias gradients.
            _gn_bwd_apply_kernel  dY = alpha * dU + beta * Y + delta   (per (head, sample, channel) coefs)
            _norm_silu_kernel   layer d's input a_{d-1} again (d >= 1), for its weight gradient.
            _conv_dgrad_kernel  data gradient of a Conv4x4/s2/p1, split by the parity of the input pixel so
                                only the 4 taps that touch it are multiplied. Deeper layers: per head, and the
                                epilogue is the GroupNorm+SiLU backward of the layer below. Layer 1 (SHARED):
                                per level; the reduction runs over that level's heads x taps x channels, so the
                                feature gradient is summed over heads inside the GEMM.
            _conv_wgrad_kernel  weight gradient per sampled head and tap: [I, pixels] x [pixels, O] GEMMs whose
                                accumulator is stored as the GEMM-layout values [h, 4, 4, I, O] of the sparse
                                pool gradient (vector stores along O).

Levels in one launch. Every per-level tensor (feature, pooled weights, activations, ...) is passed as a
Triton TUPLE of pointers, and every per-level size as a tuple of ints, with the level count L a constexpr;
a program selects its level's pointers / sizes with a `tl.static_range` chain. Nothing per call is copied to
the device, so a fixed head count stays CUDA-graph capturable. Levels are ordered by depth (deepest first,
stable): the heads taking part at depth d are then a PREFIX of that order, so per-depth buffers (GroupNorm
partials, stats, affine, backward coefficients) are [H_d, ...] tensors indexed by the same "sorted head"
index at every depth. The GEMM kernels walk a COMPACTED tile list (_segments): one segment per level with
exactly its heads x tiles tiles, the segments with the longest tiles first, so no tile is idle (bounding-box
grids over all levels left up to 86% of them empty). They are PERSISTENT (_persistent): a grid of as many
programs as the GPU holds at once (SMs x the compiled variant's programs per SM) strides over that list. The small element-wise / GroupNorm
kernels keep per-level bounding boxes. Ints that depend on the head counts (head offsets, segment starts,
counts) are passed _dyn-encoded, so no count mix recompiles a kernel (tests/heads_compile_count.py). Block
sizes are per launch (cut to the largest level). Logits and final-layer gradients are in the caller's order.
Host-side work per call that is not a kernel: channels-last copies of features that are not channels-last
(ops.heads makes them once per step and saves them for the weight gradient: `inputs_cl`), weight conversion for weights not in the GEMM layout (HeadPool's
are), the final-layer gradient reductions.

Activation layout: per level and head channels-last, [h, B, S, S, O] contiguous. Kept for backward: every
layer's pre-norm conv output Y_d (input dtype), its GroupNorm (mean, rstd) [H_d, B, G, 2] and folded affine
(scale, shift) [H_d, B, 2, O] (fp32). Everything else is recomputed where it is consumed.

Hot loops (every GEMM kernel; checked on the sm_90a SASS in CI, tests/test_build.py): the per-element index math
(im2col offsets, padding masks as a bit per tap, parity shifts) is made once before the K loop, so an iteration
computes scalars only (uniform registers) plus one 64-bit add per 16-byte async copy; K steps split without
divisions (the weight gradient carries its (sample, row, column) from step to step); block sizes that divide the
problem (host-checked EVEN_* constexprs) drop the masks, and data-gradient weight columns past I wrap around
instead of being masked. The layer-1 feature gradient is written channels-last and copied into the feature's
own layout only where that differs (a strided scatter from the kernel cost 64-bit addresses per element).

Accumulation is fp32; fp32 inputs use IEEE fp32 dots unless torch's float32 matmul precision allows TF32.
Under TRITON_INTERPRET=1, half-precision operands are upcast to fp32 before tl.dot (the interpreter's
bf16 dot is wrong); the products are exact in fp32 so results are unchanged.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from nitrokernels.kernels.plan import level_order, triton_interpreting

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
def _level_of(sh, hs, L: tl.constexpr):
    """Level (position in the launch's tuples) of sorted head `sh`: hs holds each level's first sorted head."""
    lvl = sh * 0
    for l in tl.static_range(1, L):
        lvl += (sh >= _dec(hs[l])).to(tl.int32)
    return lvl


@triton.jit
def _pick(vals, lvl, L: tl.constexpr):
    """vals[lvl] of a tuple of ints (a select chain: lvl is a runtime value). Always an int32 tensor."""
    v = vals[0] + lvl * 0
    for l in tl.static_range(1, L):
        v = tl.where(lvl == l, vals[l], v)
    return v


@triton.jit
def _dec(v):
    """A count-dependent int passed encoded as 2 * v + 3 (see _dyn)."""
    return (v - 3) // 2


@triton.jit
def _pick_dyn(vals, lvl, L: tl.constexpr):
    """_pick of a tuple of _dyn-encoded ints (first sorted heads, caller offsets, counts)."""
    return _dec(_pick(vals, lvl, L))


@triton.jit
def _segment(pid, segs, seg_lvl, L: tl.constexpr):
    """(level, index within its segment) of tile `pid` of a compacted tile list: segment s owns tiles
    [segs[s], segs[s + 1]) and belongs to level seg_lvl[s] (both _dyn-encoded; see _segments)."""
    seg = pid * 0
    for s in tl.static_range(1, L):
        seg += (pid >= _dec(segs[s])).to(tl.int32)
    return _pick_dyn(seg_lvl, seg, L), pid - _pick_dyn(segs, seg, L)


@triton.jit
def _tiles(segs, L: tl.constexpr):
    """Length of the compacted tile list (the entry after the L segment starts)."""
    return _dec(segs[L])


@triton.jit
def _pick_ptr(ptrs, lvl, L: tl.constexpr):
    """ptrs[lvl] of a tuple of pointers."""
    p = ptrs[0]
    for l in tl.static_range(1, L):
        if lvl == l:
            p = ptrs[l]
    return p


@triton.jit
def _channels(chans, lvl, L: tl.constexpr, C16: tl.constexpr):
    """Input channels of the program's level. C16 (host: every level's count is a multiple of 16) restores
    the divisibility the JIT would know for a plain int argument: aligned, vectorised channel loads."""
    c = _pick(chans, lvl, L)
    if C16:
        c = tl.multiple_of(c, 16)
    return c


@triton.jit
def _pool_row(ids_ptr, lvl, lh, starts, roffs, pools, L: tl.constexpr):
    """Pool row of local head `lh` of level `lvl` (ids[start + lh] - row_offset), clamped into range, and
    whether it was in range (out-of-range ids poison that head's outputs with NaN)."""
    r = tl.load(ids_ptr + _pick_dyn(starts, lvl, L) + lh).to(tl.int64) - _pick(roffs, lvl, L)
    ok = (r >= 0) & (r < _pick(pools, lvl, L))
    return tl.where(ok, r, 0), ok


@triton.jit
def _w_strides(I, O):
    """(row, o, c, kh, kw) strides of a conv weight in the GEMM layout [P, 4, 4, I, O] (output channels
    contiguous: HeadPool's parameters; the host converts any other layout, see _gemm_weights)."""
    return 16 * I * O, 1, O, 4 * I * O, I * O


@triton.jit(do_not_specialize=["ids_ptr"])
def _conv_fwd_kernel(
    xs, ws, biases, ys, hs, starts, roffs, pools, sizes, chans,   # per level: input, weights, bias, out, ints
    segs, seg_lvl,                                     # the compacted tile list (_segments)
    ids_ptr,                                           # pool ids of all levels (caller order)
    part_ptr,                                          # out: [H, B, TT, O, 3] fp32 (count, tile mean, tile M2)
    B, O, TT,
    L: tl.constexpr, SHARED_X: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BKC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, C16: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
):
    for tile in range(tl.program_id(0), _tiles(segs, L), tl.num_programs(0)):   # persistent (see _persistent)
        _conv_fwd_tile(tile, xs, ws, biases, ys, hs, starts, roffs, pools, sizes, chans, segs, seg_lvl, ids_ptr,
                       part_ptr, B, O, TT, L, SHARED_X, BM, BN, BKC, PREC, UPCAST, C16, EVEN_K, EVEN_N)


@triton.jit
def _conv_fwd_tile(tile, xs, ws, biases, ys, hs, starts, roffs, pools, sizes, chans, segs, seg_lvl, ids_ptr,
                   part_ptr, B, O, TT, L: tl.constexpr, SHARED_X: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BKC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   C16: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """Output tile `tile` of the list: per level (largest K first) its heads x samples x row tiles x column
    blocks."""
    lvl, local = _segment(tile, segs, seg_lvl, L)
    S_in = _pick(sizes, lvl, L)
    I = _channels(chans, lvl, L, C16)
    S_out = S_in // 2
    npix = S_out * S_out
    T = tl.cdiv(npix, BM)
    NB = tl.cdiv(O, BN)
    per_head = B * T * NB
    lh = local // per_head
    rem = local % per_head
    pid_n = rem % NB
    b = (rem // NB) // T
    t = (rem // NB) % T
    sh = _pick_dyn(hs, lvl, L) + lh
    row, id_ok = _pool_row(ids_ptr, lvl, lh, starts, roffs, pools, L)
    sw_p, sw_o, sw_c, sw_kh, sw_kw = _w_strides(I, O)
    hb = (sh * B + b).to(tl.int64)

    rows = t * BM + tl.arange(0, BM)
    row_ok = rows < npix
    oh = rows // S_out
    ow = rows % S_out
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < O
    ks = tl.arange(0, BKC)

    # Layer 1 (SHARED_X) reads the level's feature [B, S, S, I] (channels-last); deeper layers the
    # materialised activation silu(GroupNorm(Y_{d-1})) [h, B, S, S, I] (_norm_silu_kernel).
    x_head = lh * 0 if SHARED_X else lh
    x_base = _pick_ptr(xs, lvl, L) + (x_head * B + b).to(tl.int64) * S_in * S_in * I
    w_base = _pick_ptr(ws, lvl, L) + row * sw_p
    # Everything per element is made once, outside the K loop (the hot loop's integer pipe was busier than its
    # tensor cores): the offsets of tap (0, 0) and, per output pixel, a 16-bit mask of the taps that land inside
    # the (zero-padded) input. Per iteration only scalars change (tap, channel chunk: uniform registers).
    a_off = ((2 * oh - 1) * S_in + (2 * ow - 1))[:, None] * I + ks[None, :]
    w_off = ks[:, None] * sw_c + cols[None, :] * sw_o
    taps_ok = rows * 0
    for kh in tl.static_range(4):
        for kw in tl.static_range(4):
            ih = 2 * oh - 1 + kh
            iw = 2 * ow - 1 + kw
            inside = row_ok & (ih >= 0) & (ih < S_in) & (iw >= 0) & (iw < S_in)
            taps_ok |= inside.to(tl.int32) << (kh * 4 + kw)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # One flat (channel chunk, tap) loop: a single set of pipelined operand buffers (an unrolled tap loop
    # would give every tl.dot its own shared-memory buffers).
    for kk in range(0, tl.cdiv(I, BKC) * 16):
        tap = kk % 16
        c0 = (kk // 16) * BKC
        p_ok = ((taps_ok >> tap) & 1) != 0
        a_ptrs = x_base + (((tap // 4) * S_in + tap % 4) * I + c0) + a_off
        w_ptrs = w_base + ((tap // 4) * sw_kh + (tap % 4) * sw_kw + c0 * sw_c) + w_off
        if EVEN_K:      # host: every level's I is a multiple of BKC (SDXL: 320 / 640 / 1280 / hidden)
            a = tl.load(a_ptrs, mask=p_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=p_ok[:, None] & (c0 + ks < I)[None, :], other=0.0)
        if EVEN_K and EVEN_N:
            wt = tl.load(w_ptrs)
        else:
            wt = tl.load(w_ptrs, mask=(c0 + ks < I)[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, wt, acc, PREC, UPCAST)

    bias = tl.load(_pick_ptr(biases, lvl, L) + row * O + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = acc + bias[None, :]
    acc = tl.where(id_ok, acc, float("nan"))
    y_ptr = _pick_ptr(ys, lvl, L)
    yv = acc.to(y_ptr.dtype.element_ty)
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(y_ptr + (lh * B + b).to(tl.int64) * npix * O + rows[:, None] * O + cols[None, :], yv, mask=out_mask)

    # GroupNorm partial statistics of the stored (rounded) values, per channel: count, tile mean, centred M2.
    yf = tl.where(row_ok[:, None], yv.to(tl.float32), 0.0)
    n = tl.minimum(npix - t * BM, BM).to(tl.float32)
    tmean = tl.sum(yf, axis=0) / n
    dev = tl.where(row_ok[:, None], yf - tmean[None, :], 0.0)
    m2 = tl.sum(dev * dev, axis=0)
    pbase = part_ptr + (hb * TT + t) * O * 3 + cols * 3
    tl.store(pbase, tl.zeros_like(tmean) + n, mask=col_ok)
    tl.store(pbase + 1, tmean, mask=col_ok)
    tl.store(pbase + 2, m2, mask=col_ok)


@triton.jit(do_not_specialize=["ids_ptr"])
def _gn_fwd_finish_kernel(
    gammas, betas, ntiles, hs, starts, roffs, pools,   # per level: pooled norm weight / bias [P, O], tiles written
    ids_ptr, part_ptr,                                 # partials [H, B, TT, O, 3] (tiles >= ntiles[level] unwritten)
    stats_ptr, aff_ptr,                                # out: (mean, rstd) [H, B, G, 2], (scale, shift) [H, B, 2, O]
    B, O, TT, G, CPG, eps,
    L: tl.constexpr, BT: tl.constexpr, BG: tl.constexpr, BC: tl.constexpr,
):
    """Chan's combination of the tile partials of one (head, sample), all groups at once (blocks [tile, group,
    channel in group]); then the folded affine a = silu(y * scale + shift) with gamma / beta gathered by id."""
    hb = tl.program_id(0)
    sh = hb // B
    lvl = _level_of(sh, hs, L)
    row, _ = _pool_row(ids_ptr, lvl, sh - _pick_dyn(hs, lvl, L), starts, roffs, pools, L)
    gi = tl.arange(0, BG)
    j = tl.arange(0, BC)
    cs = gi[:, None] * CPG + j[None, :]                                  # [BG, BC] channel index
    c_ok = (gi < G)[:, None] & (j < CPG)[None, :]
    base = part_ptr + hb.to(tl.int64) * TT * O * 3 + cs[None, :, :] * 3
    T = _pick(ntiles, lvl, L)
    total = tl.zeros((BG,), dtype=tl.float32)
    wsum = tl.zeros((BG,), dtype=tl.float32)
    for t0 in range(0, T, BT):                          # pass 1: counts and count-weighted tile means
        ts = t0 + tl.arange(0, BT)
        m = (ts < T)[:, None, None] & c_ok[None, :, :]
        ptr = base + ts[:, None, None] * O * 3
        n = tl.load(ptr, mask=m, other=0.0)
        total += tl.sum(tl.sum(n, axis=2), axis=0)
        wsum += tl.sum(tl.sum(n * tl.load(ptr + 1, mask=m, other=0.0), axis=2), axis=0)
    mean = wsum / tl.where(gi < G, total, 1.0)
    m2 = tl.zeros((BG,), dtype=tl.float32)
    for t0 in range(0, T, BT):                          # pass 2: M2 = sum M2_t + sum n_t (mean_t - mean)^2
        ts = t0 + tl.arange(0, BT)
        m = (ts < T)[:, None, None] & c_ok[None, :, :]
        ptr = base + ts[:, None, None] * O * 3
        n = tl.load(ptr, mask=m, other=0.0)
        dv = tl.where(m, tl.load(ptr + 1, mask=m, other=0.0) - mean[None, :, None], 0.0)
        m2 += tl.sum(tl.sum(tl.load(ptr + 2, mask=m, other=0.0) + n * dv * dv, axis=2), axis=0)
    rstd = 1.0 / tl.sqrt(m2 / tl.where(gi < G, total, 1.0) + eps)
    sbase = stats_ptr + (hb.to(tl.int64) * G + gi) * 2
    tl.store(sbase, mean, mask=gi < G)
    tl.store(sbase + 1, rstd, mask=gi < G)
    gamma = tl.load(_pick_ptr(gammas, lvl, L) + row * O + cs, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(_pick_ptr(betas, lvl, L) + row * O + cs, mask=c_ok, other=0.0).to(tl.float32)
    scale = rstd[:, None] * gamma
    abase = aff_ptr + hb.to(tl.int64) * 2 * O + cs
    tl.store(abase, scale, mask=c_ok)
    tl.store(abase + O, beta - mean[:, None] * scale, mask=c_ok)


@triton.jit(do_not_specialize=["ids_ptr"])
def _final_fwd_kernel(
    ys, affs, ws, biases, hs, starts, roffs, pools,    # per level: Y_D [h, B, S, S, I], affine of its depth, ...
    ids_ptr, out_ptr,                                  # out: [H, B] (GLOBAL) or [H, B, S, S], caller order
    B, S, I,
    L: tl.constexpr, GLOBAL: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
):
    """GLOBAL: K == S, valid conv to 1x1 -> tap index == pixel: z = sum_{q,c} a[q, c] * w[c, q] (T == 1).
    Local (K == 1): z[q] = sum_c a[q, c] * w[c]."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    sh = tl.program_id(2)
    lvl = _level_of(sh, hs, L)
    lh = sh - _pick_dyn(hs, lvl, L)
    row, id_ok = _pool_row(ids_ptr, lvl, lh, starts, roffs, pools, L)
    hb = (sh * B + b).to(tl.int64)
    npix = S * S
    y_base = _pick_ptr(ys, lvl, L) + (lh * B + b).to(tl.int64) * npix * I
    aff = _pick_ptr(affs, lvl, L) + hb * 2 * I
    w_base = _pick_ptr(ws, lvl, L) + row * I * npix if GLOBAL else _pick_ptr(ws, lvl, L) + row * I
    q = pid_p * BP + tl.arange(0, BP)
    q_ok = q < npix
    acc = tl.zeros((BP, BC), dtype=tl.float32)
    for c0 in range(0, I, BC):
        cs = c0 + tl.arange(0, BC)
        c_ok = cs < I
        m = q_ok[:, None] & c_ok[None, :]
        sc = tl.load(aff + cs, mask=c_ok, other=0.0)
        sf = tl.load(aff + I + cs, mask=c_ok, other=0.0)
        yv = tl.load(y_base + q[:, None] * I + cs[None, :], mask=m, other=0.0)
        u = yv.to(tl.float32) * sc[None, :] + sf[None, :]
        a = tl.where(m, (u * tl.sigmoid(u)).to(yv.dtype).to(tl.float32), 0.0)
        if GLOBAL:   # weight [1, I, S, S]: tap == pixel
            wv = tl.load(w_base + cs[None, :] * npix + q[:, None], mask=m, other=0.0).to(tl.float32)
            acc += a * wv
        else:
            wv = tl.load(w_base + cs, mask=c_ok, other=0.0).to(tl.float32)
            acc += a * wv[None, :]
    bias = tl.load(_pick_ptr(biases, lvl, L) + row).to(tl.float32)
    oh = (_pick_dyn(starts, lvl, L) + lh).to(tl.int64) * B + b          # caller-order output row
    if GLOBAL:
        z = tl.sum(tl.sum(acc, axis=1), axis=0) + bias
        z = tl.where(id_ok, z, float("nan"))
        tl.store(out_ptr + oh, z.to(out_ptr.dtype.element_ty))
    else:
        z = tl.sum(acc, axis=1) + bias
        z = tl.where(id_ok, z, float("nan"))
        tl.store(out_ptr + oh * npix + q, z.to(out_ptr.dtype.element_ty), mask=q_ok)


@triton.jit(do_not_specialize=["ids_ptr"])
def _final_bwd_kernel(
    ys, affs, stats, ws, gus, parts, tts, hs, starts, roffs, pools,   # per level (affine / stats / partials
                                                                     # of the level's own last depth)
    gz_ptr,                                            # dLogits [H, B] (GLOBAL) or [H, B, S, S], caller order
    ids_ptr,
    gwp_ptr,                                           # out: final-weight grad partials (caller order), see below
    B, S, I, T, G, CPG,
    L: tl.constexpr, GLOBAL: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr,
):
    """dU_D = dLogits * w * SiLU'(u) into gus[level] ([h, B, S, S, I]); per tile (sum dU, sum dU*xhat, sum Y)
    into parts[level] ([H_D, B, TT, I, 3], tiles 0..T-1)."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    sh = tl.program_id(2)
    lvl = _level_of(sh, hs, L)
    lh = sh - _pick_dyn(hs, lvl, L)
    row, id_ok = _pool_row(ids_ptr, lvl, lh, starts, roffs, pools, L)
    hb = (sh * B + b).to(tl.int64)
    oh = (_pick_dyn(starts, lvl, L) + lh).to(tl.int64) * B + b
    npix = S * S
    off_y = (lh * B + b).to(tl.int64) * npix * I
    y_base = _pick_ptr(ys, lvl, L) + off_y
    gu_base = _pick_ptr(gus, lvl, L) + off_y
    aff = _pick_ptr(affs, lvl, L) + hb * 2 * I
    st = _pick_ptr(stats, lvl, L) + hb * G * 2
    pbase = _pick_ptr(parts, lvl, L) + (hb * _pick(tts, lvl, L) + pid_t) * I * 3
    w_base = _pick_ptr(ws, lvl, L) + row * I * npix if GLOBAL else _pick_ptr(ws, lvl, L) + row * I
    q = pid_t * BQ + tl.arange(0, BQ)
    q_ok = q < npix
    if GLOBAL:
        gz = tl.load(gz_ptr + oh).to(tl.float32)
    else:
        gz = tl.load(gz_ptr + oh * npix + q, mask=q_ok, other=0.0).to(tl.float32)
    for c0 in range(0, I, BC):
        cs = c0 + tl.arange(0, BC)
        c_ok = cs < I
        m = q_ok[:, None] & c_ok[None, :]
        sc = tl.load(aff + cs, mask=c_ok, other=0.0)
        sf = tl.load(aff + I + cs, mask=c_ok, other=0.0)
        grp = cs // CPG
        mean = tl.load(st + grp * 2, mask=c_ok, other=0.0)
        rstd = tl.load(st + grp * 2 + 1, mask=c_ok, other=0.0)
        offs = q[:, None] * I + cs[None, :]
        yraw = tl.load(y_base + offs, mask=m, other=0.0)
        yv = yraw.to(tl.float32)
        u = yv * sc[None, :] + sf[None, :]
        sig = tl.sigmoid(u)
        if GLOBAL:   # valid conv to 1x1: tap index == input pixel
            wv = tl.load(w_base + cs[None, :] * npix + q[:, None], mask=m, other=0.0).to(tl.float32)
            ga = gz * wv
        else:        # 1x1 conv
            wv = tl.load(w_base + cs, mask=c_ok, other=0.0).to(tl.float32)
            ga = gz[:, None] * wv[None, :]
        ga = ga.to(yraw.dtype).to(tl.float32)
        gu = tl.where(m, ga * _silu_grad(u, sig), 0.0)
        gu = tl.where(id_ok, gu, float("nan"))
        gur = gu.to(yraw.dtype)
        tl.store(gu_base + offs, gur, mask=m)
        gu = tl.where(m, gur.to(tl.float32), 0.0)
        xhat = (yv - mean[None, :]) * rstd[None, :]
        tl.store(pbase + cs * 3, tl.sum(gu, axis=0), mask=c_ok)
        tl.store(pbase + cs * 3 + 1, tl.sum(tl.where(m, gu * xhat, 0.0), axis=0), mask=c_ok)
        tl.store(pbase + cs * 3 + 2, tl.sum(yv, axis=0), mask=c_ok)
        a = tl.where(m, (u * sig).to(yraw.dtype).to(tl.float32), 0.0)
        if GLOBAL:   # gwp [H, B, I, S*S]: dW[c, tap] for this sample (T == 1)
            tl.store(gwp_ptr + oh * I * npix + cs[None, :] * npix + q[:, None], gz * a, mask=m)
        else:        # gwp [H, B*T, I]: sum over this tile's pixels
            tl.store(gwp_ptr + (oh * T + pid_t) * I + cs, tl.sum(gz[:, None] * a, axis=0), mask=c_ok)


@triton.jit(do_not_specialize=["ids_ptr"])
def _gn_bwd_finish_kernel(
    gammas, sizes, ntiles, hs, starts, roffs, pools,   # per level: pooled norm weight [P, I], map size, tiles
    ids_ptr, part_ptr, stats_ptr,                      # partials [H, B, TT, I, 3] (tiles >= ntiles unwritten), stats
    coef_ptr,                                          # out: [H, B, I, 3] fp32 (alpha, beta, delta)
    gg_ptr, gbe_ptr, gb_ptr,                           # out: [H, I] gamma / beta / conv-bias grads (param dtype)
    B, I, TT, G, CPG,
    L: tl.constexpr, BT: tl.constexpr, BG: tl.constexpr, BC: tl.constexpr,
):
    """GroupNorm backward of one head, all groups at once: dY = alpha*dU + beta*Y + delta. The bias gradient
    comes from the fp32 sums, sum(dY) = alpha*sum(dU) + beta*sum(Y) + delta*npix (summing the rounded dY
    would cancel heavily: dY sums to zero over every group)."""
    sh = tl.program_id(0)
    lvl = _level_of(sh, hs, L)
    row, _ = _pool_row(ids_ptr, lvl, sh - _pick_dyn(hs, lvl, L), starts, roffs, pools, L)
    S = _pick(sizes, lvl, L)
    npix = (S * S).to(tl.float32)
    n = npix * CPG
    gi = tl.arange(0, BG)
    j = tl.arange(0, BC)
    cs = gi[:, None] * CPG + j[None, :]                                  # [BG, BC]
    g_ok = gi < G
    c_ok = g_ok[:, None] & (j < CPG)[None, :]
    gamma = tl.load(_pick_ptr(gammas, lvl, L) + row * I + cs, mask=c_ok, other=0.0).to(tl.float32)
    T = _pick(ntiles, lvl, L)
    acc_g = tl.zeros((BG, BC), dtype=tl.float32)
    acc_be = tl.zeros((BG, BC), dtype=tl.float32)
    acc_b = tl.zeros((BG, BC), dtype=tl.float32)
    for b in range(B):
        hb = (sh * B + b).to(tl.int64)
        p1 = tl.zeros((BG, BC), dtype=tl.float32)
        p2 = tl.zeros((BG, BC), dtype=tl.float32)
        p3 = tl.zeros((BG, BC), dtype=tl.float32)
        for t0 in range(0, T, BT):
            ts = t0 + tl.arange(0, BT)
            m = (ts < T)[:, None, None] & c_ok[None, :, :]
            ptr = part_ptr + (hb * TT + ts[:, None, None]) * I * 3 + cs[None, :, :] * 3
            p1 += tl.sum(tl.load(ptr, mask=m, other=0.0), axis=0)
            p2 += tl.sum(tl.load(ptr + 1, mask=m, other=0.0), axis=0)
            p3 += tl.sum(tl.load(ptr + 2, mask=m, other=0.0), axis=0)
        c1 = tl.sum(gamma * p1, axis=1) / n              # mean of dxhat, per group
        c2 = tl.sum(gamma * p2, axis=1) / n              # mean of dxhat * xhat
        mean = tl.load(stats_ptr + (hb * G + gi) * 2, mask=g_ok, other=0.0)
        rstd = tl.load(stats_ptr + (hb * G + gi) * 2 + 1, mask=g_ok, other=0.0)
        alpha = rstd[:, None] * gamma
        beta = tl.zeros_like(alpha) + (-rstd * rstd * c2)[:, None]
        delta = tl.zeros_like(alpha) + (rstd * rstd * c2 * mean - rstd * c1)[:, None]
        cb = coef_ptr + (hb * I + cs) * 3
        tl.store(cb, alpha, mask=c_ok)
        tl.store(cb + 1, beta, mask=c_ok)
        tl.store(cb + 2, delta, mask=c_ok)
        acc_g += p2
        acc_be += p1
        acc_b += alpha * p1 + beta * p3 + delta * npix
    out = sh.to(tl.int64) * I + cs
    tl.store(gg_ptr + out, acc_g.to(gg_ptr.dtype.element_ty), mask=c_ok)
    tl.store(gbe_ptr + out, acc_be.to(gbe_ptr.dtype.element_ty), mask=c_ok)
    tl.store(gb_ptr + out, acc_b.to(gb_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _norm_silu_kernel(ys, acts, sizes, hs, aff_ptr, B, I,
                      L: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr):
    """acts[level] = silu(ys[level] * scale + shift) in the activations' dtype ([h, B, S, S, I], per
    (head, sample, channel) folded GroupNorm affine): the next layer's input, made ONCE instead of in every
    A-tile load of its forward and weight-gradient GEMMs."""
    pid_q = tl.program_id(0)
    pid_c = tl.program_id(1)
    hb = tl.program_id(2)
    sh = hb // B
    b = hb % B
    lvl = _level_of(sh, hs, L)
    S = _pick(sizes, lvl, L)
    npix = S * S
    if pid_q * BQ >= npix:
        return
    lh = sh - _pick_dyn(hs, lvl, L)
    q = pid_q * BQ + tl.arange(0, BQ)
    cs = pid_c * BC + tl.arange(0, BC)
    c_ok = cs < I
    m = (q < npix)[:, None] & c_ok[None, :]
    offs = (lh * B + b).to(tl.int64) * npix * I + q[:, None] * I + cs[None, :]
    y = tl.load(_pick_ptr(ys, lvl, L) + offs, mask=m, other=0.0)
    sc = tl.load(aff_ptr + hb.to(tl.int64) * 2 * I + cs, mask=c_ok, other=0.0)
    sf = tl.load(aff_ptr + hb.to(tl.int64) * 2 * I + I + cs, mask=c_ok, other=0.0)
    u = y.to(tl.float32) * sc[None, :] + sf[None, :]
    a_ptr = _pick_ptr(acts, lvl, L)
    tl.store(a_ptr + offs, (u * tl.sigmoid(u)).to(a_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gn_bwd_apply_kernel(gs, ys, sizes, hs, coef_ptr, B, I,
                         L: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr):
    """In place on gs[level]: dY = alpha * dU + beta * Y + delta (coefficients per (head, sample, channel))."""
    pid_q = tl.program_id(0)
    pid_c = tl.program_id(1)
    hb = tl.program_id(2)
    sh = hb // B
    b = hb % B
    lvl = _level_of(sh, hs, L)
    S = _pick(sizes, lvl, L)
    npix = S * S
    if pid_q * BQ >= npix:
        return
    lh = sh - _pick_dyn(hs, lvl, L)
    q = pid_q * BQ + tl.arange(0, BQ)
    cs = pid_c * BC + tl.arange(0, BC)
    c_ok = cs < I
    m = (q < npix)[:, None] & c_ok[None, :]
    offs = (lh * B + b).to(tl.int64) * npix * I + q[:, None] * I + cs[None, :]
    g_ptr = _pick_ptr(gs, lvl, L)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = tl.load(_pick_ptr(ys, lvl, L) + offs, mask=m, other=0.0).to(tl.float32)
    cb = coef_ptr + (hb.to(tl.int64) * I + cs) * 3
    al = tl.load(cb, mask=c_ok, other=0.0)
    be = tl.load(cb + 1, mask=c_ok, other=0.0)
    de = tl.load(cb + 2, mask=c_ok, other=0.0)
    out = al[None, :] * g + be[None, :] * y + de[None, :]
    tl.store(g_ptr + offs, out.to(g_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["ids_ptr"])
def _conv_dgrad_kernel(
    gys, ws, outs, yps, sizes, chans, counts, hs, starts, roffs, pools,   # per level
    segs, seg_lvl,                                     # the compacted grid (_segments)
    aff_ptr, stats_ptr, part_ptr,                      # (not SHARED) layer d-1: affine, stats, partials out
    ids_ptr, B, O, TT, G, CPG,
    L: tl.constexpr, SHARED: tl.constexpr, CLASSES: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BKO: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    C16: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, KT: tl.constexpr,
):
    """dX of layer d. SHARED (d = 0): one segment of the compacted tile list per level, the reduction runs over
    the level's heads, out = the feature gradient (channels-last). Otherwise per sorted head: out = dU_{d-1}
    [h, B, S, S, I] (GroupNorm + SiLU backward of layer d-1 fused), partials into [H, B, TT, I, 3] at tile
    cls * T + t. Within a segment: (head,) sample, parity-class group, row tile, column block."""
    for tile in range(tl.program_id(0), _tiles(segs, L), tl.num_programs(0)):   # persistent (see _persistent)
        _conv_dgrad_tile(tile, gys, ws, outs, yps, sizes, chans, counts, hs, starts, roffs, pools, segs, seg_lvl,
                         aff_ptr, stats_ptr, part_ptr, ids_ptr, B, O, TT, G, CPG, L, SHARED, CLASSES, BM, BN, BKO,
                         PREC, UPCAST, C16, EVEN_K, EVEN_N, KT)


@triton.jit
def _conv_dgrad_tile(tile, gys, ws, outs, yps, sizes, chans, counts, hs, starts, roffs, pools, segs, seg_lvl,
                     aff_ptr, stats_ptr, part_ptr, ids_ptr, B, O, TT, G, CPG, L: tl.constexpr,
                     SHARED: tl.constexpr, CLASSES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BKO: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, C16: tl.constexpr,
                     EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, KT: tl.constexpr):
    lvl, local = _segment(tile, segs, seg_lvl, L)
    S_in = _pick(sizes, lvl, L)
    I = _channels(chans, lvl, L, C16)
    hc = (S_in + 1) // 2
    T = tl.cdiv(hc * hc, BM)
    NB = tl.cdiv(I, BN)
    ncls = 4 // CLASSES
    per_head = B * ncls * T * NB
    if SHARED:
        sh = lvl * 0
    else:
        sh = _pick_dyn(hs, lvl, L) + local // per_head
    rem = local % per_head
    pid_n = rem % NB
    t = (rem // NB) % T
    cls0 = ((rem // (NB * T)) % ncls) * CLASSES
    b = rem // (NB * T * ncls)
    for cls in range(cls0, cls0 + CLASSES):   # CLASSES input-pixel parity classes per program
        _dgrad_class(gys, ws, outs, yps, counts, hs, starts, roffs, pools,
                     aff_ptr, stats_ptr, part_ptr, ids_ptr, B, O, TT, G, CPG, lvl, sh, S_in, I, T, b, cls, t,
                     pid_n, L, SHARED, BM, BN, BKO, PREC, UPCAST, EVEN_K, EVEN_N, KT, C16)


@triton.jit
def _dgrad_class(gys, ws, outs, yps, counts, hs, starts, roffs, pools,
                 aff_ptr, stats_ptr, part_ptr, ids_ptr, B, O, TT, G, CPG, lvl, sh, S_in, I, T, b, cls, t,
                 pid_n, L: tl.constexpr, SHARED: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BKO: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                 EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, KT: tl.constexpr, C16: tl.constexpr):
    ph = cls // 2
    pw = cls % 2
    S_out = S_in // 2
    hc = (S_in + 1) // 2
    r = t * BM + tl.arange(0, BM)
    rh = r // hc
    rw = r % hc
    qh = 2 * rh + ph
    qw = 2 * rw + pw
    row_ok = (r < hc * hc) & (qh < S_in) & (qw < S_in)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < I
    npo = S_out * S_out
    sw_p, sw_o, sw_c, sw_kh, sw_kw = _w_strides(I, O)
    gy_ptr = _pick_ptr(gys, lvl, L)
    w_ptr = _pick_ptr(ws, lvl, L)
    # Per element, once: tap j (kh = 1 - ph + 2 (j // 2), kw = 1 - pw + 2 (j % 2)) reads dY at output pixel
    # (rh + ph - j // 2, rw + pw - j % 2); the offsets of j's pixel shift 0 and a 4-bit mask per input pixel of
    # the taps whose output pixel exists. The K steps then change scalars only (see _dgrad_step).
    ks = tl.arange(0, BKO)
    # the parity's part of the tap offsets (ph, pw are fixed per program) folded in here too
    a_off = ((rh + ph) * S_out + rw + pw)[:, None] * O + ks[None, :]
    # Columns past I (I not a multiple of BN) wrap around (Triton's matmul idiom) instead of being masked: the
    # weight loads stay unpredicated 16-byte copies (I is a multiple of 16: C16); those columns are not stored.
    w_cols = tl.max_contiguous(tl.multiple_of(cols % I, 16), 16) if C16 and not EVEN_N else cols
    w_off = ks[:, None] * sw_o + w_cols[None, :] * sw_c + ((1 - ph) * sw_kh + (1 - pw) * sw_kw)
    WRAPPED: tl.constexpr = EVEN_N or C16
    taps_ok = r * 0
    for j in tl.static_range(4):
        oh = rh + ph - j // 2
        ow = rw + pw - j % 2
        inside = row_ok & (oh >= 0) & (ow >= 0) & (oh < S_out) & (ow < S_out)
        taps_ok |= inside.to(tl.int32) << j

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # KT = cdiv(O, BKO) * 4 K steps per head (a constexpr: O is the pool's hidden width, so no recompiles;
    # the head / step split of the flat loop below is then a shift, not a division)
    if SHARED:
        # ONE flat (head, output-channel chunk, tap of this parity) loop over the level's heads: a nested head
        # loop kept the pipeliner from overlapping MMA groups (WARPGROUP.DEPBAR.LE gsb0, 0x0 every iteration).
        # the level's id range, selected once (per-iteration selects over all levels' tuples made ptxas spill)
        id_base = ids_ptr + _pick_dyn(starts, lvl, L)
        roff = _pick(roffs, lvl, L).to(tl.int64)
        pool = _pick(pools, lvl, L)
        nbad = lvl * 0
        for it in range(0, _pick_dyn(counts, lvl, L) * KT):
            hh = it // KT
            prow = tl.load(id_base + hh).to(tl.int64) - roff
            id_ok = (prow >= 0) & (prow < pool)
            row = tl.where(id_ok, prow, 0)
            nbad += (id_ok == 0).to(tl.int32)
            acc = _dgrad_step(gy_ptr + (hh * B + b).to(tl.int64) * npo * O, w_ptr + row * sw_p, it % KT, acc,
                              a_off, w_off, taps_ok, ks, col_ok, S_out, O, sw_o, sw_kh, sw_kw,
                              BKO, PREC, UPCAST, EVEN_K, WRAPPED)
    else:
        lh = sh - _pick_dyn(hs, lvl, L)
        row, id_ok = _pool_row(ids_ptr, lvl, lh, starts, roffs, pools, L)
        nbad = (id_ok == 0).to(tl.int32)
        gy_base = gy_ptr + (lh * B + b).to(tl.int64) * npo * O
        for kk in range(0, tl.cdiv(O, BKO) * 4):   # a runtime bound: a constexpr one (KT) is unrolled
            acc = _dgrad_step(gy_base, w_ptr + row * sw_p, kk, acc, a_off, w_off, taps_ok, ks, col_ok, S_out,
                              O, sw_o, sw_kh, sw_kw, BKO, PREC, UPCAST, EVEN_K, WRAPPED)
    acc = tl.where(nbad == 0, acc, float("nan"))     # a head id out of range poisons the result

    m = row_ok[:, None] & col_ok[None, :]
    out_ptr = _pick_ptr(outs, lvl, L)
    if SHARED:
        # channels-last [B, S, S, I]: vector stores along the channels (the host copies into the feature's
        # own layout where that differs; a strided scatter from the kernel needed 64-bit addresses per element)
        tl.store(out_ptr + b.to(tl.int64) * S_in * S_in * I + (qh * S_in + qw)[:, None] * I + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=m)
    else:
        # GroupNorm + SiLU backward of layer d-1, up to the group reductions (_gn_bwd_finish_kernel).
        hb = (sh * B + b).to(tl.int64)
        lh = sh - _pick_dyn(hs, lvl, L)
        ga = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        # 64-bit scalar bases, 32-bit per-element offsets (the epilogue's registers: no spills at 64 x 256)
        base = (lh * B + b).to(tl.int64) * S_in * S_in * I
        offs = (qh * S_in + qw)[:, None] * I + cols[None, :]
        yv = tl.load(_pick_ptr(yps, lvl, L) + base + offs, mask=m, other=0.0).to(tl.float32)
        sc = tl.load(aff_ptr + hb * 2 * I + cols, mask=col_ok, other=0.0)
        sf = tl.load(aff_ptr + hb * 2 * I + I + cols, mask=col_ok, other=0.0)
        grp = cols // CPG
        mean = tl.load(stats_ptr + (hb * G + grp) * 2, mask=col_ok, other=0.0)
        rstd = tl.load(stats_ptr + (hb * G + grp) * 2 + 1, mask=col_ok, other=0.0)
        u = yv * sc[None, :] + sf[None, :]
        gu = tl.where(m, ga * _silu_grad(u, tl.sigmoid(u)), 0.0)
        gur = gu.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + base + offs, gur, mask=m)
        gu = tl.where(m, gur.to(tl.float32), 0.0)
        xhat = (yv - mean[None, :]) * rstd[None, :]
        pbase = part_ptr + (hb * TT + cls * T + t) * I * 3 + cols * 3
        p_ok = col_ok & ((cols * 0 + t) < T)   # a tile t >= T would land on the next class's tiles
        tl.store(pbase, tl.sum(gu, axis=0), mask=p_ok)
        tl.store(pbase + 1, tl.sum(tl.where(m, gu * xhat, 0.0), axis=0), mask=p_ok)
        tl.store(pbase + 2, tl.sum(yv, axis=0), mask=p_ok)


@triton.jit
def _dgrad_step(gy_base, w_base, kk, acc, a_off, w_off, taps_ok, ks, col_ok, S_out, O, sw_o, sw_kh, sw_kw,
                BKO: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
                ALL_COLS: tl.constexpr):
    """One K step of the data gradient: output-channel chunk kk // 4, tap j = kk % 4 of the program's pixel parity.
    Only scalars are computed here; the per-element offsets (the parity folded in) and tap masks come from
    _dgrad_class."""
    j = kk % 4
    o0 = (kk // 4) * BKO
    jh = j // 2                             # kernel row 1 - ph + 2 jh, column 1 - pw + 2 jw (a_off / w_off
    jw = j % 2                              # hold the parity's part): dY at pixel (rh + ph - jh, rw + pw - jw)
    p_ok = ((taps_ok >> j) & 1) != 0
    a_ptrs = gy_base + (o0 - (jh * S_out + jw) * O) + a_off
    w_ptrs = w_base + (jh * 2 * sw_kh + jw * 2 * sw_kw + o0 * sw_o) + w_off
    if EVEN_K:          # host: O is a multiple of BKO
        a = tl.load(a_ptrs, mask=p_ok[:, None], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=p_ok[:, None] & (o0 + ks < O)[None, :], other=0.0)
    if EVEN_K and ALL_COLS:   # ... and every weight column in range (I a multiple of BN, or wrapped columns)
        wt = tl.load(w_ptrs)
    else:
        wt = tl.load(w_ptrs, mask=(o0 + ks < O)[:, None] & col_ok[None, :], other=0.0)
    return _mma(a, wt, acc, PREC, UPCAST)


@triton.jit
def _conv_wgrad_kernel(
    gys, xs, gws, sizes, chans, hs,                    # per level: dY_d, layer input, out [h, 4, 4, I, O], ints
    segs, seg_lvl,                                     # the compacted grid (_segments)
    B, O,
    L: tl.constexpr, SHARED_X: tl.constexpr, TAPS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, C16: tl.constexpr,
    ALIGNED: tl.constexpr, EVEN_C: tl.constexpr, EVEN_O: tl.constexpr, EVEN_Q: tl.constexpr,
):
    """dW[tap, c, o] = sum_{b, p} x[b, pix(p, tap), c] * dY[b, p, o]: the GEMM is [c, pixels] x [pixels, o], so
    the accumulator's fast dimension is o, the GEMM layout's contiguous one (vector stores)."""
    for tile in range(tl.program_id(0), _tiles(segs, L), tl.num_programs(0)):   # persistent (see _persistent)
        _conv_wgrad_tile(tile, gys, xs, gws, sizes, chans, hs, segs, seg_lvl, B, O, L, SHARED_X, TAPS, BM, BN, BK,
                         PREC, UPCAST, C16, ALIGNED, EVEN_C, EVEN_O, EVEN_Q)


@triton.jit
def _conv_wgrad_tile(tile, gys, xs, gws, sizes, chans, hs, segs, seg_lvl, B, O, L: tl.constexpr,
                     SHARED_X: tl.constexpr, TAPS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, C16: tl.constexpr,
                     ALIGNED: tl.constexpr, EVEN_C: tl.constexpr, EVEN_O: tl.constexpr, EVEN_Q: tl.constexpr):
    """Tile `tile` of the list: per level (largest maps first) its heads x tap groups x output-channel blocks x
    input-channel blocks (the level's own count)."""
    lvl, local = _segment(tile, segs, seg_lvl, L)
    I = _channels(chans, lvl, L, C16)
    NC = tl.cdiv(I, BN)
    NO = tl.cdiv(O, BM)
    per_head = (16 // TAPS) * NO * NC
    lh = local // per_head
    rem = local % per_head
    pid_c = rem % NC
    pid_o = (rem // NC) % NO
    tap0 = (rem // (NC * NO)) * TAPS
    S_in = _pick(sizes, lvl, L)
    os_ = pid_o * BM + tl.arange(0, BM)
    o_ok = os_ < O
    cs = pid_c * BN + tl.arange(0, BN)
    c_ok = cs < I
    gy_ptr = _pick_ptr(gys, lvl, L)
    x_ptr = _pick_ptr(xs, lvl, L)
    gw_ptr = _pick_ptr(gws, lvl, L)
    for tap in range(tap0, tap0 + TAPS):   # TAPS taps per program
        _wgrad_tap(gy_ptr, x_ptr, gw_ptr, B, S_in, I, O, lh, tap, os_, o_ok, cs, c_ok,
                   SHARED_X, BM, BN, BK, PREC, UPCAST, ALIGNED, EVEN_C, EVEN_O, EVEN_Q)


@triton.jit
def _wgrad_tap(gy_ptr, x_ptr, gw_ptr, B, S_in, I, O, lh, tap, os_, o_ok, cs, c_ok,
               SHARED_X: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr, EVEN_C: tl.constexpr,
               EVEN_O: tl.constexpr, EVEN_Q: tl.constexpr):
    """One tap's [I, O] weight gradient. The reduction runs over q = (sample, output pixel) flattened: dY of one
    head is contiguous over q, and small maps fill a K step with several samples (one loop, pipelined)."""
    kh = tap // 4
    kw = tap % 4
    S_out = S_in // 2
    npo = S_out * S_out
    nq = B * npo
    xs_b = S_in * S_in * I                       # sample stride of the layer input
    x_head = lh * 0 if SHARED_X else lh          # layer 1 reads the level's feature [B, S, S, I]
    gy_base = gy_ptr + lh.to(tl.int64) * nq * O
    x_base = x_ptr + (x_head * B).to(tl.int64) * xs_b
    ar = tl.arange(0, BK)
    # ALIGNED (host: every K step starts at a sample, or at a pixel row inside one map, or inside one row, as
    # with power-of-two maps): q = q0 + ar splits into the (sample, row, column) of q0, carried from step to
    # step without divisions, plus that of ar, made once: every per-element offset is loop-invariant and each
    # bound one unsigned compare of an invariant against a scalar.
    db = ar // npo
    dr2 = 2 * ((ar % npo) // S_out)
    dc2 = 2 * (ar % S_out)
    g_off = ar[:, None] * O + os_[None, :]
    x_off = (db * xs_b + (dr2 * S_in + dc2) * I)[:, None] + cs[None, :]
    inc_c = BK % S_out                           # per K step: column, row and sample increments
    inc_r = (BK // S_out) % S_out
    inc_b = BK // npo
    b0 = lh * 0
    r0 = lh * 0
    c0 = lh * 0
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for q0 in range(0, nq, BK):
        if ALIGNED:
            lo_h = 1 - kh - 2 * r0               # ih = 2 (r0 + dr) - 1 + kh in [0, S_in)  <=>  dr2 - lo_h < S_in
            lo_w = 1 - kw - 2 * c0
            x_ok = ((dr2 - lo_h).to(tl.uint32) < S_in) & ((dc2 - lo_w).to(tl.uint32) < S_in)
            x_ptrs = x_base + (b0 * xs_b + ((2 * r0 - 1 + kh) * S_in + 2 * c0 - 1 + kw) * I) + x_off
            c0 += inc_c
            wrap_c = c0 >= S_out
            c0 = tl.where(wrap_c, c0 - S_out, c0)
            r0 += inc_r + wrap_c.to(tl.int32)
            wrap_r = r0 >= S_out
            r0 = tl.where(wrap_r, r0 - S_out, r0)
            b0 += inc_b + wrap_r.to(tl.int32)
        else:                                    # any sizes: the split of every element, every step
            q = q0 + ar
            ih = 2 * ((q % npo) // S_out) - 1 + kh
            iw = 2 * (q % S_out) - 1 + kw
            x_ok = (ih >= 0) & (ih < S_in) & (iw >= 0) & (iw < S_in)
            x_ptrs = x_base + ((q // npo) * xs_b + (ih * S_in + iw) * I)[:, None] + cs[None, :]
        g_ptrs = gy_base + q0 * O + g_off
        if EVEN_Q:       # host: B * npo is a multiple of BK: no step runs past the last sample
            g_mask = (ar >= 0)[:, None]
        else:
            q_ok = ar < nq - q0
            g_mask = q_ok[:, None]
            x_ok = x_ok & q_ok
        if EVEN_O:       # host: O is a multiple of BM
            g = tl.load(g_ptrs, mask=g_mask, other=0.0) if not EVEN_Q else tl.load(g_ptrs)
        else:
            g = tl.load(g_ptrs, mask=g_mask & o_ok[None, :], other=0.0)
        if EVEN_C:       # host: every level's I is a multiple of BN
            a = tl.load(x_ptrs, mask=x_ok[:, None], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=x_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mma(tl.trans(a), g, acc, PREC, UPCAST)
    out = gw_ptr + lh.to(tl.int64) * 16 * I * O + tap * I * O + cs[:, None] * O + os_[None, :]
    tl.store(out, acc.to(gw_ptr.dtype.element_ty), mask=c_ok[:, None] & o_ok[None, :])


# ============================================================================================ host side

# Upper limits of the block sizes (each block is also cut down to the problem size, never below 16).
# GPU values are a reasonable default for Hopper/Ampere (untuned). The interpreter runs one program at a
# time with a per-operation overhead, so it gets larger blocks (fewer programs / loop trips).
# Tests set BLOCK_OVERRIDE to small values to exercise the multi-tile paths (stats combination, K loops).
GPU_BLOCKS = dict(fwd_m=128, fwd_n=256, fwd_kc=64, fin_p=64, fin_c=64, dg_m=128, dg_n=128, dg_m_epi=64, dg_n_epi=128, dg_ko=128,
                  dg_classes=1, wg_m=256, wg_n=128, wg_k=64, wg_taps=1, ew_q=64, ew_c=128, gn_t=4)
# "programs": the persistent grid under the interpreter (small, so that programs loop over several tiles)
INTERPRETER_BLOCKS = dict(fwd_m=256, fwd_n=128, fwd_kc=64, fin_p=256, fin_c=128, dg_m=256, dg_n=128, dg_m_epi=256,
                          dg_n_epi=128,
                          dg_ko=64,
                          dg_classes=4, wg_m=128, wg_n=128, wg_k=1024, wg_taps=16, ew_q=1024, ew_c=128,
                          gn_t=256, programs=3)
# fp32 dots run on FMA units (IEEE) with fp32 operands: smaller tiles keep them out of register spills.
GPU_FP32_BLOCKS = dict(GPU_BLOCKS, fwd_m=64, fwd_n=64, fwd_kc=16, dg_m=64, dg_n=64, dg_m_epi=64, dg_n_epi=64, dg_ko=16,
                       wg_m=64, wg_n=64, wg_k=16)
BLOCK_OVERRIDE: dict[str, int] = {}
_DTYPE = [torch.bfloat16]      # dtype of the launch being configured (set by the host functions)


def _cap(name: str) -> int:
    if name in BLOCK_OVERRIDE:
        return BLOCK_OVERRIDE[name]
    if triton_interpreting():
        return INTERPRETER_BLOCKS[name]
    return (GPU_FP32_BLOCKS if _DTYPE[0] == torch.float32 else GPU_BLOCKS)[name]


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """The shared feature in channels-last memory (contiguous channel loads); no copy if it already is."""
    return x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous(memory_format=torch.channels_last)


def _k_steps_aligned(bk: int, s_out: int) -> bool:
    """Whether K steps of bk over (sample, pixel) of s_out x s_out maps split without carries (_wgrad_tap)."""
    npo = s_out * s_out
    return bk % npo == 0 or (npo % bk == 0 and (bk % s_out == 0 or s_out % bk == 0))


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


def _stages(bm: int, bn: int, bk: int) -> int:
    """Pipeline depth: as many operand buffers as fit in ~200 KiB of shared memory (2-byte operands), 2..4."""
    per_stage = (bm * bk + bk * bn) * 2
    return max(2, min(4, (200 * 1024) // max(per_stage, 1)))




# ------------------------------------------------------------------------------------------ level plan
class _Plan:
    """Host-side description of one call: sizes per level and depth, launch order, per-level tuples."""

    def __init__(self, features, conv_weights, ids, counts, row_offsets):
        self.counts = [int(c) for c in counts]
        self.depths = [len(w) for w in conv_weights]
        self.order, self.first = level_order(self.counts, self.depths)
        self.starts = [sum(self.counts[:l]) for l in range(len(counts))]     # caller offsets into ids / logits
        self.roffs = [int(r) for r in row_offsets]
        self.pools = [w[0].shape[0] for w in conv_weights]
        self.sizes = []                                  # sizes[l][d]: map size at the input of layer d
        for f, depth in zip(features, self.depths):
            s = [f.shape[2]]
            for _ in range(depth):
                s.append(s[-1] // 2)
            self.sizes.append(s)
        self.chans = [[w.shape[2] for w in ws] for ws in conv_weights]   # input channels of layer d
        self.dmax = max((self.depths[l] for l in self.order), default=0)   # deepest level with heads
        self.ids = ids

    def at(self, d: int) -> list[int]:
        """Levels (launch order) that have a layer d."""
        return [l for l in self.order if self.depths[l] > d]

    def heads(self, d: int) -> int:
        return sum(self.counts[l] for l in self.at(d))

    def heads_of(self, lv) -> int:
        return sum(self.counts[l] for l in lv)

    def meta(self, lv) -> tuple[tuple, tuple, tuple, tuple]:
        """(first sorted head, caller offset, row offset, pool size) per level: what _pool_row needs (the
        count-dependent first two _dyn-encoded)."""
        return (_dyn(self.first[l] for l in lv), _dyn(self.starts[l] for l in lv),
                tuple(self.roffs[l] for l in lv), tuple(self.pools[l] for l in lv))



def _gemm_weights(conv_weights, d: int, lv) -> tuple:
    """Layer-d conv weights of the levels `lv` in the kernels' GEMM layout [P, 4, 4, I, O] (output channels
    contiguous). A [P, O, I, 4, 4]-shaped weight that is a permuted view of such storage (HeadPool passes its
    [P, 4, 4, I, O] parameters as `w.permute(0, 4, 3, 1, 2)`) costs nothing; any other layout (a plain
    [P, O, I, 4, 4] tensor) is converted here, a copy of the whole pooled tensor per call."""
    out = []
    for l in lv:
        g = conv_weights[l][d].permute(0, 3, 4, 2, 1)
        out.append(g if g.is_contiguous() else g.contiguous())
    return tuple(out)


def _norm_silu(plan, ys, aff, d: int, lv, batch: int, channels: int) -> tuple:
    """silu(GroupNorm(Y_d)) of the levels `lv` (a prefix of the levels at depth d, so `aff` indexes them by
    the same sorted head), [h, B, S, S, O] in Y's dtype: one launch."""
    acts = tuple(torch.empty_like(ys[l][d]) for l in lv)
    out_sizes = tuple(plan.sizes[l][d + 1] for l in lv)
    eq = _clamp_block(max(out_sizes) ** 2, 16, "ew_q")
    ec = _clamp_block(channels, 16, "ew_c")
    _norm_silu_kernel[(triton.cdiv(max(out_sizes) ** 2, eq), triton.cdiv(channels, ec), plan.heads_of(lv) * batch)](
        tuple(ys[l][d] for l in lv), acts, out_sizes, plan.meta(lv)[0], aff, batch, channels,
        L=len(lv), BQ=eq, BC=ec, num_warps=4)
    return acts


def _dyn(values) -> tuple:
    """Per-level ints that depend on the head counts (first sorted heads, caller offsets, counts), encoded as
    2 * v + 3 for the kernels (decoded by _dec). Triton specialises every int argument -- tuple elements too,
    where do_not_specialize does not reach -- on == 1 and on divisibility by 16: plain values would compile a
    new kernel for every count mix. Encoded they are odd and >= 3, so one compiled kernel serves every mix
    (tests/heads_compile_count.py counts the compiles)."""
    return tuple(2 * int(v) + 3 for v in values)


def _segments(programs, work) -> tuple[tuple, tuple, int]:
    """A compacted tile list over the levels of one launch (Triton's grouped-GEMM pattern without idle
    bounding-box tiles): one segment per level holding exactly its `programs[i]` tiles, segments with the most
    `work` per tile first (the longest tiles start first, the short ones fill the tail).
    Returns (segment starts followed by the list's length, segment -> level position, both _dyn-encoded;
    number of tiles)."""
    order = sorted(range(len(programs)), key=lambda i: -work[i])
    starts, n = [], 0
    for i in order:
        starts.append(n)
        n += programs[i]
    return _dyn(starts + [n]), _dyn(order), n


# Resident programs per SM of each compiled GEMM kernel variant, from its registers / shared memory / warps
# (filled by the first launch of the variant; _persistent).
_RESIDENT: dict[tuple, int] = {}


def _variant(kernel, kwargs) -> tuple:
    return (kernel.__name__,) + tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)))


def _resident_programs(compiled, device) -> int:
    """How many programs of a compiled kernel fit on one SM at once: the fewest allowed by registers (allocated
    per warp in units of 256), shared memory (1 KiB reserved per block) and warps (64 per SM)."""
    props = torch.cuda.get_device_properties(device)
    warps = int(compiled.metadata.num_warps)
    regs = max(1, int(getattr(compiled, "n_regs", 0) or 255))
    regs_per_sm = int(getattr(props, "regs_per_multiprocessor", 65536) or 65536)
    smem_per_sm = int(getattr(props, "shared_memory_per_multiprocessor", 233472) or 233472)
    by_regs = regs_per_sm // (warps * (-(-regs * 32 // 256) * 256))
    by_smem = smem_per_sm // (int(compiled.metadata.shared) + 1024)
    return max(1, min(by_regs, by_smem, 64 // warps, 32))


def _persistent(kernel, tiles: int, device, *args, **kwargs) -> None:
    """Launch a GEMM kernel over a compacted list of `tiles` tiles PERSISTENTLY: a grid of at most as many
    programs as are resident on the GPU at once (SMs x programs per SM of this compiled variant), each walking
    the list with a stride of the grid, so every tile is taken by a program already running (no second wave
    of launches, the longest tiles first). The variant's first launch has one program per tile and records its
    occupancy. Under TRITON_INTERPRET=1 the grid is cut to _cap("programs") so that the tests run the loop."""
    key = _variant(kernel, kwargs)
    if triton_interpreting():
        grid = min(tiles, _cap("programs"))
    elif key in _RESIDENT:
        grid = min(tiles, _RESIDENT[key] * torch.cuda.get_device_properties(device).multi_processor_count)
    else:
        grid = tiles
    compiled = kernel[(grid,)](*args, **kwargs)
    if key not in _RESIDENT and not triton_interpreting() and hasattr(compiled, "metadata"):
        _RESIDENT[key] = _resident_programs(compiled, device)


def _contig(tensors, lv, d=None) -> tuple:
    """Per-level pooled tensors, contiguous (the kernels derive their strides from the shapes; parameters
    already are, so this copies nothing unless a caller passes a strided view)."""
    return tuple((tensors[l] if d is None else tensors[l][d]).contiguous() for l in lv)


def _c16(chans) -> bool:
    return all(c % 16 == 0 for c in chans)


def _gn_blocks(tiles: int, groups: int, cpg: int) -> dict:
    """Blocks of the GroupNorm finish kernels: [tiles per trip, groups, channels per group]."""
    return dict(BT=max(2, min(_cap("gn_t"), _np2(tiles))), BG=max(2, _np2(groups)), BC=max(2, _np2(cpg)))


def _dgrad_config(plan: _Plan, d: int, lv, out_channels: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BKO, tiles of the largest level, parity classes per program) of layer d's data gradient."""
    hcs = [(plan.sizes[l][d] + 1) // 2 for l in lv]
    bm = _clamp_block(max(hcs) ** 2, 16, "dg_m" if d == 0 else "dg_m_epi")
    bn = _clamp_block(max(plan.chans[l][d] for l in lv), 16, "dg_n" if d == 0 else "dg_n_epi")
    bko = _clamp_block(out_channels, 16, "dg_ko")
    return bm, bn, bko, max(triton.cdiv(h * h, bm) for h in hcs), _cap("dg_classes")


def _final_config(plan: _Plan, hidden: int, is_global: bool) -> tuple[int, int, int, int]:
    """(map size, BP/BQ, BC, tiles) of the final conv (the same for every level)."""
    s = plan.sizes[plan.order[0]][-1]
    npix = s * s
    bp = _np2(npix) if is_global else _clamp_block(npix, 16, "fin_p")
    return s, bp, _clamp_block(hidden, 16, "fin_c"), triton.cdiv(npix, bp)


# ------------------------------------------------------------------------------------------ forward
def levels_forward(features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights, final_biases,
                   ids, counts, row_offsets, num_groups, eps):
    """Forward of every sampled head of every level: one launch per kernel type per layer depth.

    Per-level lists (conv_weights[l][d], ...); level l's heads are rows ids[o_l : o_l + counts[l]] -
    row_offsets[l] of its pooled tensors, o_l = sum(counts[:l]). Inputs are validated by the caller
    (ops.heads): at every depth the levels share their output channels, and all final maps / final convs
    have one shape. Returns (logits [H, B] or [H, B, S, S] in the caller's order, ys[l][d] [h_l, B, S, S, O],
    stats[d] [H_d, B, G, 2], affine[d] [H_d, B, 2, O]; the last two fp32 in launch order, see module doc).
    """
    ids = ids.contiguous()  # the kernels read ids[i] at ids_ptr + i (a HeadSample can be a strided view)
    plan = _Plan(features, conv_weights, ids, counts, row_offsets)
    batch = features[0].shape[0]
    dtype, device = features[0].dtype, features[0].device
    prec, upcast = _dot_mode(dtype)
    _DTYPE[0] = dtype
    groups = num_groups
    ys = [[torch.empty((plan.counts[l], batch, plan.sizes[l][d + 1], plan.sizes[l][d + 1], w.shape[1]),
                       dtype=dtype, device=device) for d, w in enumerate(conv_weights[l])]
          for l in range(len(features))]
    stats, affine = [], []
    xs = {l: _channels_last(features[l]) for l in plan.order}
    for d in range(plan.dmax):
        lv = plan.at(d)
        heads = plan.heads(d)
        c_out = conv_weights[lv[0]][d].shape[1] if lv else 1
        stats.append(torch.empty((heads, batch, groups, 2), dtype=torch.float32, device=device))
        affine.append(torch.empty((heads, batch, 2, c_out), dtype=torch.float32, device=device))
        if not lv:
            continue
        sizes = tuple(plan.sizes[l][d] for l in lv)
        chans = tuple(plan.chans[l][d] for l in lv)
        npix = [(s // 2) ** 2 for s in sizes]
        bm = _clamp_block(max(npix), 16, "fwd_m")
        bn = _clamp_block(c_out, 16, "fwd_n")
        bkc = _clamp_block(max(chans), 16, "fwd_kc")
        tiles = max(triton.cdiv(n, bm) for n in npix)
        part = torch.empty((heads, batch, tiles, c_out, 3), dtype=torch.float32, device=device)
        segs, seg_lvl, nprog = _segments(
            [plan.counts[l] * batch * triton.cdiv(n, bm) * triton.cdiv(c_out, bn) for l, n in zip(lv, npix)], chans)
        _persistent(
            _conv_fwd_kernel, nprog, device, tuple(xs[l] for l in lv), _gemm_weights(conv_weights, d, lv), _contig(conv_biases, lv, d),
            tuple(ys[l][d] for l in lv), *plan.meta(lv), sizes, chans, segs, seg_lvl, ids, part,
            batch, c_out, tiles,
            L=len(lv), SHARED_X=d == 0, BM=bm, BN=bn, BKC=bkc, PREC=prec, UPCAST=upcast,
            C16=_c16(chans), EVEN_K=all(c % bkc == 0 for c in chans), EVEN_N=c_out % bn == 0,
            num_warps=_warps(bm, bn), num_stages=_stages(bm, bn, bkc))
        cpg = c_out // groups
        _gn_fwd_finish_kernel[(heads * batch,)](
            _contig(norm_weights, lv, d), _contig(norm_biases, lv, d), tuple(triton.cdiv(n, bm) for n in npix),
            *plan.meta(lv), ids, part, stats[d],
            affine[d], batch, c_out, tiles, groups, cpg, float(eps),
            L=len(lv), **_gn_blocks(tiles, groups, cpg), num_warps=4)
        nxt = plan.at(d + 1)
        if nxt:        # the next layer's input, normalised + SiLU once (freed after that layer's launch)
            acts = _norm_silu(plan, ys, affine[d], d, nxt, batch, c_out)
            xs = dict(zip(nxt, acts))

    total = sum(plan.counts)
    lv = plan.order
    k = final_weights[0].shape[-1]
    is_global = k != 1
    if not lv:
        s = plan.sizes[0][-1]
        return features[0].new_empty((0, batch) if is_global else (0, batch, s, s)), ys, stats, affine
    hidden = final_weights[lv[0]].shape[2]
    s, bp, bc, tiles = _final_config(plan, hidden, is_global)
    out = torch.empty((total, batch) if is_global else (total, batch, s, s), dtype=dtype, device=device)
    _final_fwd_kernel[(tiles, batch, total)](
        tuple(ys[l][-1] for l in lv), tuple(affine[plan.depths[l] - 1] for l in lv), _contig(final_weights, lv),
        _contig(final_biases, lv), *plan.meta(lv), ids, out, batch, s, hidden,
        L=len(lv), GLOBAL=is_global, BP=bp, BC=bc, num_warps=4)
    return out, ys, stats, affine


# ------------------------------------------------------------------------------------------ backward
def levels_backward(grad_out, features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights,
                    final_biases, ids, counts, row_offsets, ys, stats, affine, num_groups, eps,
                    need_feature_grads, need_param_grads, inputs_cl=None):
    """Backward of `levels_forward` from its saved (ys, stats, affine): one launch per kernel type per depth.
    `inputs_cl` (per level, optional): channels-last copies of the features made by the forward (ops.heads
    saves them), read by the layer-1 weight gradient instead of copying the feature again.

    Returns (d_features [per level, None where not needed or the level has no heads], dW [l][d] values
    [h_l, 4, 4, I, O] (the GEMM layout), db[d] / dgamma[d] / dbeta[d] [H_d, O] (launch order), dW_final [H, 1, I, k, k] and
    db_final [H, 1] (caller order)); parameter gradients are None when not needed.
    """
    ids = ids.contiguous()  # the kernels read ids[i] at ids_ptr + i (a HeadSample can be a strided view)
    plan = _Plan(features, conv_weights, ids, counts, row_offsets)
    batch = features[0].shape[0]
    dtype, device = features[0].dtype, features[0].device
    prec, upcast = _dot_mode(dtype)
    _DTYPE[0] = dtype
    groups = num_groups
    nlev, dmax, order = len(features), plan.dmax, plan.order
    g_features = [None] * nlev
    g_w = [[None] * plan.depths[l] for l in range(nlev)]
    g_b, g_gamma, g_beta = [None] * dmax, [None] * dmax, [None] * dmax
    total = sum(plan.counts)
    if not order:
        return g_features, g_w, g_b, g_gamma, g_beta, None, None
    grad_out = grad_out.contiguous()
    c_out = [conv_weights[plan.at(d)[0]][d].shape[1] for d in range(dmax)]

    # GroupNorm-backward partials of depth d: written by the final kernel (levels whose last layer is d) at
    # tiles [0, T_final) and by layer d+1's data gradient (deeper levels) at tiles [0, 4 * T_level).
    k = final_weights[0].shape[-1]
    is_global = k != 1
    hidden = final_weights[order[0]].shape[2]
    s_fin, bq, bc, t_fin = _final_config(plan, hidden, is_global)
    dg_cfg = {d: _dgrad_config(plan, d, plan.at(d), c_out[d]) for d in range(1, dmax)}
    written = {}                                 # (level, depth) -> partial tiles written
    for l in order:
        for d in range(plan.depths[l]):
            if d == plan.depths[l] - 1:
                written[(l, d)] = t_fin
            else:
                hc = (plan.sizes[l][d + 1] + 1) // 2
                written[(l, d)] = 4 * triton.cdiv(hc * hc, dg_cfg[d + 1][0])
    part_tiles = [max(written[(l, d)] for l in plan.at(d)) for d in range(dmax)]
    parts = [torch.empty((plan.heads(d), batch, part_tiles[d], c_out[d], 3), dtype=torch.float32, device=device)
             for d in range(dmax)]

    # ---- final conv and the GroupNorm + SiLU of every level's last layer
    gus = {(l, plan.depths[l] - 1): torch.empty_like(ys[l][-1]) for l in order}
    last = [plan.depths[l] - 1 for l in order]
    npix = s_fin * s_fin
    gwp = torch.empty((total, batch, hidden, npix) if is_global else (total, batch * t_fin, hidden),
                      dtype=torch.float32, device=device)
    _final_bwd_kernel[(t_fin, batch, total)](
        tuple(ys[l][-1] for l in order), tuple(affine[d] for d in last), tuple(stats[d] for d in last),
        _contig(final_weights, order), tuple(gus[(l, d)] for l, d in zip(order, last)),
        tuple(parts[d] for d in last), tuple(part_tiles[d] for d in last), *plan.meta(order),
        grad_out, ids, gwp, batch, s_fin, hidden, t_fin, groups, hidden // groups,
        L=len(order), GLOBAL=is_global, BQ=bq, BC=bc, num_warps=4)
    g_wf = g_bf = None
    if need_param_grads:
        g_wf = gwp.sum(1).view(total, 1, hidden, k, k).to(dtype)
        g_bf = grad_out.float().reshape(total, -1).sum(1, keepdim=True).to(dtype)

    # ---- conv layers, last to first
    for d in range(dmax - 1, -1, -1):
        lv = plan.at(d)
        heads, co = plan.heads(d), c_out[d]
        meta = plan.meta(lv)
        # GroupNorm backward of layer d (its dU is complete: final kernel or layer d+1's data gradient)
        cpg = co // groups
        coef = torch.empty((heads, batch, co, 3), dtype=torch.float32, device=device)
        g_gamma[d], g_beta[d], g_b[d] = (torch.empty((heads, co), dtype=dtype, device=device) for _ in range(3))
        out_sizes = tuple(plan.sizes[l][d + 1] for l in lv)
        _gn_bwd_finish_kernel[(heads,)](
            _contig(norm_weights, lv, d), out_sizes, tuple(written[(l, d)] for l in lv), *meta, ids, parts[d], stats[d], coef, g_gamma[d], g_beta[d],
            g_b[d], batch, co, part_tiles[d], groups, cpg,
            L=len(lv), **_gn_blocks(part_tiles[d], groups, cpg), num_warps=4)
        eq = _clamp_block(max(out_sizes) ** 2, 16, "ew_q")
        ec = _clamp_block(co, 16, "ew_c")
        gy = tuple(gus[(l, d)] for l in lv)
        _gn_bwd_apply_kernel[(triton.cdiv(max(out_sizes) ** 2, eq), triton.cdiv(co, ec), heads * batch)](
            gy, tuple(ys[l][d] for l in lv), out_sizes, meta[0], coef, batch, co,
            L=len(lv), BQ=eq, BC=ec, num_warps=4)

        sizes = tuple(plan.sizes[l][d] for l in lv)
        chans = tuple(plan.chans[l][d] for l in lv)
        if need_param_grads:
            if d == 0:
                xs = tuple(inputs_cl[l] if inputs_cl is not None and inputs_cl[l] is not None
                           else _channels_last(features[l]) for l in lv)
            else:     # layer d's input silu(GroupNorm(Y_{d-1})), made once for its weight gradient
                xs = _norm_silu(plan, ys, affine[d - 1], d - 1, lv, batch, plan.chans[lv[0]][d])
            bm = _clamp_block(co, 16, "wg_m")
            bn = _clamp_block(max(chans), 16, "wg_n")
            bk = _clamp_block(batch * max(s // 2 for s in sizes) ** 2, 16, "wg_k")   # K runs over samples x pixels
            taps = _cap("wg_taps")
            segs, seg_lvl, nprog = _segments(
                [plan.counts[l] * (16 // taps) * triton.cdiv(co, bm) * triton.cdiv(c, bn) for l, c in zip(lv, chans)],
                [s * s for s in sizes])
            for l in lv:
                g_w[l][d] = torch.empty((plan.counts[l], 4, 4, plan.chans[l][d], co), dtype=dtype, device=device)
            _persistent(
                _conv_wgrad_kernel, nprog, device, gy, xs, tuple(g_w[l][d] for l in lv), sizes, chans, meta[0], segs, seg_lvl, batch, co,
                L=len(lv), SHARED_X=d == 0, TAPS=taps, BM=bm, BN=bn, BK=bk, PREC=prec, UPCAST=upcast,
                C16=_c16(chans), ALIGNED=all(_k_steps_aligned(bk, s // 2) for s in sizes),
                EVEN_C=all(c % bn == 0 for c in chans), EVEN_O=co % bm == 0,
                EVEN_Q=all(batch * (s // 2) ** 2 % bk == 0 for s in sizes), num_warps=_warps(bm, bn), num_stages=min(3, _stages(bn, bm, bk)))   # 4: spills
            del xs
        if d == 0:
            _feature_grads(plan, conv_weights, gus, features, need_feature_grads, g_features, co, prec, upcast)
            break
        bm, bn, bko, tiles, classes = dg_cfg[d]
        for l in lv:
            gus[(l, d - 1)] = torch.empty_like(ys[l][d - 1])
        segs, seg_lvl, nprog = _segments(
            [plan.counts[l] * batch * (4 // classes) * triton.cdiv(((s + 1) // 2) ** 2, bm) * triton.cdiv(c, bn)
             for l, s, c in zip(lv, sizes, chans)], [0] * len(lv))
        _persistent(
            _conv_dgrad_kernel, nprog, device, gy, _gemm_weights(conv_weights, d, lv), tuple(gus[(l, d - 1)] for l in lv),
            tuple(ys[l][d - 1] for l in lv), sizes, chans, _dyn(plan.counts[l] for l in lv), *meta,
            segs, seg_lvl, affine[d - 1], stats[d - 1], parts[d - 1], ids,
            batch, co, part_tiles[d - 1], groups, chans[0] // groups,
            L=len(lv), SHARED=False, CLASSES=classes, BM=bm, BN=bn, BKO=bko, PREC=prec,
            UPCAST=upcast, C16=_c16(chans), EVEN_K=co % bko == 0, EVEN_N=all(c % bn == 0 for c in chans),
            KT=triton.cdiv(co, bko) * 4, num_warps=_warps(bm, bn), num_stages=_stages(bm, bn, bko))

    if not need_param_grads:
        g_w = [[None] * plan.depths[l] for l in range(nlev)]
        g_b, g_gamma, g_beta = [None] * dmax, [None] * dmax, [None] * dmax
    return g_features, g_w, g_b, g_gamma, g_beta, g_wf, g_bf


def _feature_grads(plan, conv_weights, gus, features, need, g_features, c_out, prec, upcast):
    """Layer 1's data gradient of every level that needs it: one segment of the grid per level, summed over the
    level's heads inside the GEMM, written channels-last, returned in the feature's own memory layout."""
    lv = [l for l in plan.order if need[l]]
    if not lv:
        return
    bm, bn, bko, tiles, classes = _dgrad_config(plan, 0, lv, c_out)
    outs = tuple(torch.empty_like(features[l], memory_format=torch.channels_last) for l in lv)
    chans = tuple(plan.chans[l][0] for l in lv)
    batch = features[0].shape[0]
    sizes = tuple(plan.sizes[l][0] for l in lv)
    # one segment per level; the reduction runs over the level's heads: the most heads first
    segs, seg_lvl, nprog = _segments(
        [batch * (4 // classes) * triton.cdiv(((s + 1) // 2) ** 2, bm) * triton.cdiv(c, bn) for s, c in zip(sizes, chans)],
        [plan.counts[l] for l in lv])
    _persistent(
        _conv_dgrad_kernel, nprog, outs[0].device, tuple(gus[(l, 0)] for l in lv), _gemm_weights(conv_weights, 0, lv), outs, outs,
        sizes, chans, _dyn(plan.counts[l] for l in lv), *plan.meta(lv),
        segs, seg_lvl, plan.ids, plan.ids, plan.ids, plan.ids, batch, c_out, 1, 1, 1,
        L=len(lv), SHARED=True, CLASSES=classes, BM=bm, BN=bn, BKO=bko, PREC=prec,
        UPCAST=upcast, C16=_c16(chans), EVEN_K=c_out % bko == 0, EVEN_N=all(c % bn == 0 for c in chans),
        KT=triton.cdiv(c_out, bko) * 4, num_warps=_warps(bm, bn), num_stages=min(3, _stages(bm, bn, bko)))
    for l, g in zip(lv, outs):      # the feature's own layout (no copy when it is channels-last)
        cl = features[l].is_contiguous(memory_format=torch.channels_last)
        g_features[l] = g if cl else torch.empty_like(features[l]).copy_(g)
