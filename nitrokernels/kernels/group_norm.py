"""GroupNorm (+ time-embedding add, + SiLU) in Triton: forward and backward, NCHW and channels_last.

The input is viewed as x[n, c, s] (s = flattened spatial position) through three strides, so a contiguous
NCHW tensor (stride_s = 1) and a channels_last one (stride_c = 1) run the same kernels with no layout copy;
Triton specialises the unit stride, so each layout gets coalesced, vectorised loads along its contiguous dim.
With y = x + temb[n, c] (temb optional), per group (n, g) of Cg = C / G channels:

    mean, rstd = mean(y), 1 / sqrt(var(y) + eps)          (fp32, biased variance, over Cg * HW values)
    xhat = (y - mean) * rstd;  z = xhat * w[c] + b[c];  out = silu(z) (or z when act is None)

Work is split over many programs so that batch 1 fills the GPU: a program owns a tile of BLOCK_C channels
and a CHUNK of spatial positions ("chunk" k of K along s) of one sample, never a whole group.

Forward, three launches:
  1. _gn_stats      per (n, chunk k, channel c): mean and M2 (sum of squared deviations) of x over the chunk,
                    merged tile by tile with Chan's formula (no E[x^2] - E[x]^2 cancellation).
  2. _gn_finalize   per (n, g): merges the K * Cg partials (temb only shifts each channel's mean, so it is added
                    here, exactly), writes mean / rstd [N, G] (saved for backward) and per-channel
                    coefficients a = rstd * w, s = b + (temb - mean) * a, so that z = x * a + s.
  3. _gn_apply      out = act(x * a + s): one FMA (+ SiLU) per element.
x is read twice (stats, apply); at the SDXL sizes a sample's activation (<= 21 MB at batch 2) mostly stays in
the H100's 50 MB L2 between the two passes.

Backward (dz = dout * silu'(z), dxhat = dz * w), three launches:
  1. _gn_bwd_reduce per (n, chunk, c): A = sum dz, B = sum dz * xhat, X = sum xhat.
  2. _gn_bwd_finalize per (n, g): c1 = sum_c w A / M, c2 = sum_c w B / M (M = Cg * HW), and per channel the
                    sums over chunks: SA, SB (dbias / dweight = their sums over n) and
                    dtemb[n, c] = rstd * (w A - HW c1 - c2 X)  (dtemb is the spatial sum of dx).
  3. _gn_bwd_apply  dx = rstd * (dz * w - c1 - xhat * c2)   (z, xhat recomputed from x; nothing else saved).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# =========================================================================================== kernels
@triton.jit
def _gn_stats(X, PMEAN, PM2, C, HW, K, CHUNK, s_n, s_c, s_s,
              BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    s_start = pid_k * CHUNK
    s_end = tl.minimum(s_start + CHUNK, HW)
    rows = X + n.to(tl.int64) * s_n + offs_c[:, None] * s_c
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(s_start, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < s_end)[None, :]
        v = tl.load(rows + offs_s[None, :] * s_s, mask=mask, other=0.0).to(tl.float32)
        cnt = tl.minimum(s_end - s0, BLOCK_S).to(tl.float32)
        t_mean = tl.sum(v, axis=1) / cnt
        d = tl.where(mask, v - t_mean[:, None], 0.0)
        t_m2 = tl.sum(d * d, axis=1)
        new_count = count + cnt
        delta = t_mean - mean
        mean = mean + delta * (cnt / new_count)
        m2 = m2 + t_m2 + delta * delta * (count * cnt / new_count)
        count = new_count
    out = (n * K + pid_k) * C + offs_c
    tl.store(PMEAN + out, mean, mask=mask_c)
    tl.store(PM2 + out, m2, mask=mask_c)


@triton.jit
def _gn_finalize(PMEAN, PM2, TEMB, W, B, MEAN, RSTD, COEF_A, COEF_S, C, HW, G, CG, K, CHUNK, eps,
                 HAS_TEMB: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr):
    pid = tl.program_id(0)  # n * G + g
    n = pid // G
    c0 = (pid % G) * CG
    total = (CG * HW).to(tl.float32)
    # pass 1: group mean of y = x + temb (temb shifts each channel's mean)
    acc = tl.zeros([BLOCK_K, BLOCK_CG], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        cnt = tl.minimum(HW - ks * CHUNK, CHUNK).to(tl.float32)
        for j0 in range(0, CG, BLOCK_CG):
            js = j0 + tl.arange(0, BLOCK_CG)
            m = (ks < K)[:, None] & (js < CG)[None, :]
            pm = tl.load(PMEAN + (n * K + ks[:, None]) * C + c0 + js[None, :], mask=m, other=0.0)
            if HAS_TEMB:
                t = tl.load(TEMB + n * C + c0 + js, mask=js < CG, other=0.0).to(tl.float32)
                pm = pm + t[None, :]
            acc += tl.where(m, pm * cnt[:, None], 0.0)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    # pass 2: M2 of the group = sum of the partial M2s + the spread of the partial means (Chan)
    acc = tl.zeros([BLOCK_K, BLOCK_CG], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        cnt = tl.minimum(HW - ks * CHUNK, CHUNK).to(tl.float32)
        for j0 in range(0, CG, BLOCK_CG):
            js = j0 + tl.arange(0, BLOCK_CG)
            m = (ks < K)[:, None] & (js < CG)[None, :]
            offs = (n * K + ks[:, None]) * C + c0 + js[None, :]
            pm = tl.load(PMEAN + offs, mask=m, other=0.0)
            if HAS_TEMB:
                t = tl.load(TEMB + n * C + c0 + js, mask=js < CG, other=0.0).to(tl.float32)
                pm = pm + t[None, :]
            pm2 = tl.load(PM2 + offs, mask=m, other=0.0)
            d = pm - mean
            acc += tl.where(m, pm2 + cnt[:, None] * d * d, 0.0)
    var = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)
    # per-channel affine coefficients: z = x * a + s
    for j0 in range(0, CG, BLOCK_CG):
        js = j0 + tl.arange(0, BLOCK_CG)
        mj = js < CG
        c = c0 + js
        a = tl.zeros([BLOCK_CG], dtype=tl.float32) + rstd
        if HAS_W:
            a = a * tl.load(W + c, mask=mj, other=1.0).to(tl.float32)
        s = -mean * a
        if HAS_TEMB:
            s += tl.load(TEMB + n * C + c, mask=mj, other=0.0).to(tl.float32) * a
        if HAS_B:
            s += tl.load(B + c, mask=mj, other=0.0).to(tl.float32)
        tl.store(COEF_A + n * C + c, a, mask=mj)
        tl.store(COEF_S + n * C + c, s, mask=mj)


@triton.jit
def _silu(z):
    return z / (1.0 + tl.exp(-z))


@triton.jit
def _gn_apply(X, Y, COEF_A, COEF_S, C, HW, CHUNK, s_n, s_c, s_s,
              ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    a = tl.load(COEF_A + n * C + offs_c, mask=mask_c, other=0.0)[:, None]
    s = tl.load(COEF_S + n * C + offs_c, mask=mask_c, other=0.0)[:, None]
    s_start = pid_k * CHUNK
    s_end = tl.minimum(s_start + CHUNK, HW)
    sample = n.to(tl.int64) * s_n
    rows = offs_c[:, None] * s_c
    for s0 in range(s_start, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < s_end)[None, :]
        offs = rows + offs_s[None, :] * s_s
        v = tl.load(X + sample + offs, mask=mask, other=0.0).to(tl.float32)
        z = v * a + s
        if ACT:
            z = _silu(z)
        tl.store(Y + sample + offs, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _channel_coefs(n, offs_c, mask_c, MEAN, RSTD, W, B, TEMB, C, G, CG,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TEMB: tl.constexpr):
    """Per channel: rstd r, u = (temb - mean) * r (xhat = x * r + u), weight w, bias b."""
    grp = n * G + offs_c // CG
    mu = tl.load(MEAN + grp, mask=mask_c, other=0.0)
    r = tl.load(RSTD + grp, mask=mask_c, other=0.0)
    if HAS_TEMB:
        t = tl.load(TEMB + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        u = (t - mu) * r
    else:
        u = -mu * r
    if HAS_W:
        w = tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        w = tl.zeros_like(r) + 1.0
    if HAS_B:
        b = tl.load(B + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        b = tl.zeros_like(r)
    return r, u, w, b


@triton.jit
def _dz(dy, xhat, w, b, ACT: tl.constexpr):
    if ACT:
        z = xhat * w + b
        sig = 1.0 / (1.0 + tl.exp(-z))
        return dy * sig * (1.0 + z * (1.0 - sig))
    else:
        return dy


@triton.jit
def _gn_bwd_reduce(X, DY, MEAN, RSTD, W, B, TEMB, PA, PB, PX, C, HW, G, CG, K, CHUNK, s_n, s_c, s_s,
                   ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TEMB: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    r, u, w, b = _channel_coefs(n, offs_c, mask_c, MEAN, RSTD, W, B, TEMB, C, G, CG, HAS_W, HAS_B, HAS_TEMB)
    r, u, w, b = r[:, None], u[:, None], w[:, None], b[:, None]
    s_start = pid_k * CHUNK
    s_end = tl.minimum(s_start + CHUNK, HW)
    sample = n.to(tl.int64) * s_n
    rows = offs_c[:, None] * s_c
    acc_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_x = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(s_start, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < s_end)[None, :]
        offs = rows + offs_s[None, :] * s_s
        v = tl.load(X + sample + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + sample + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, v * r + u, 0.0)
        dz = _dz(dy, xhat, w, b, ACT)  # dy = 0 where masked, so dz = 0 there
        acc_a += tl.sum(dz, axis=1)
        acc_b += tl.sum(dz * xhat, axis=1)
        if HAS_TEMB:
            acc_x += tl.sum(xhat, axis=1)
    out = (n * K + pid_k) * C + offs_c
    tl.store(PA + out, acc_a, mask=mask_c)
    tl.store(PB + out, acc_b, mask=mask_c)
    if HAS_TEMB:  # X is only needed for dtemb
        tl.store(PX + out, acc_x, mask=mask_c)


@triton.jit
def _gn_bwd_finalize(PA, PB, PX, RSTD, W, C1, C2, SA, SB, DTEMB, C, HW, G, CG, K,
                     HAS_W: tl.constexpr, HAS_TEMB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr):
    pid = tl.program_id(0)  # n * G + g
    n = pid // G
    c0 = (pid % G) * CG
    total = (CG * HW).to(tl.float32)
    # pass 1: c1 = sum_c w A / M, c2 = sum_c w B / M
    acc_a = tl.zeros([BLOCK_K, BLOCK_CG], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_K, BLOCK_CG], dtype=tl.float32)
    for j0 in range(0, CG, BLOCK_CG):
        js = j0 + tl.arange(0, BLOCK_CG)
        if HAS_W:
            w = tl.load(W + c0 + js, mask=js < CG, other=0.0).to(tl.float32)[None, :]
        else:
            w = 1.0
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            m = (ks < K)[:, None] & (js < CG)[None, :]
            offs = (n * K + ks[:, None]) * C + c0 + js[None, :]
            acc_a += tl.load(PA + offs, mask=m, other=0.0) * w
            acc_b += tl.load(PB + offs, mask=m, other=0.0) * w
    c1 = tl.sum(tl.sum(acc_a, axis=1), axis=0) / total
    c2 = tl.sum(tl.sum(acc_b, axis=1), axis=0) / total
    tl.store(C1 + pid, c1)
    tl.store(C2 + pid, c2)
    r = tl.load(RSTD + pid)
    # pass 2: per-channel sums over the chunks -> SA, SB (dbias, dweight per sample) and dtemb
    for j0 in range(0, CG, BLOCK_CG):
        js = j0 + tl.arange(0, BLOCK_CG)
        mj = js < CG
        sa = tl.zeros([BLOCK_CG], dtype=tl.float32)
        sb = tl.zeros([BLOCK_CG], dtype=tl.float32)
        sx = tl.zeros([BLOCK_CG], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            m = (ks < K)[:, None] & mj[None, :]
            offs = (n * K + ks[:, None]) * C + c0 + js[None, :]
            sa += tl.sum(tl.load(PA + offs, mask=m, other=0.0), axis=0)
            sb += tl.sum(tl.load(PB + offs, mask=m, other=0.0), axis=0)
            if HAS_TEMB:
                sx += tl.sum(tl.load(PX + offs, mask=m, other=0.0), axis=0)
        tl.store(SA + n * C + c0 + js, sa, mask=mj)
        tl.store(SB + n * C + c0 + js, sb, mask=mj)
        if HAS_TEMB:
            if HAS_W:
                wa = sa * tl.load(W + c0 + js, mask=mj, other=0.0).to(tl.float32)
            else:
                wa = sa
            tl.store(DTEMB + n * C + c0 + js, r * (wa - HW * c1 - c2 * sx), mask=mj)


@triton.jit
def _gn_bwd_apply(X, DY, DX, MEAN, RSTD, W, B, TEMB, C1, C2, C, HW, G, CG, CHUNK, s_n, s_c, s_s,
                  ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TEMB: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    r, u, w, b = _channel_coefs(n, offs_c, mask_c, MEAN, RSTD, W, B, TEMB, C, G, CG, HAS_W, HAS_B, HAS_TEMB)
    grp = n * G + offs_c // CG
    c1 = tl.load(C1 + grp, mask=mask_c, other=0.0)
    c2 = tl.load(C2 + grp, mask=mask_c, other=0.0)
    k_dz = (r * w)[:, None]           # dx = dz * (r w) - xhat * (r c2) - r c1
    k_x = (-r * c2)[:, None]
    k_0 = (-r * c1)[:, None]
    r, u, w, b = r[:, None], u[:, None], w[:, None], b[:, None]
    s_start = pid_k * CHUNK
    s_end = tl.minimum(s_start + CHUNK, HW)
    sample = n.to(tl.int64) * s_n
    rows = offs_c[:, None] * s_c
    for s0 in range(s_start, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < s_end)[None, :]
        offs = rows + offs_s[None, :] * s_s
        v = tl.load(X + sample + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + sample + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = v * r + u
        dz = _dz(dy, xhat, w, b, ACT)
        dx = dz * k_dz + xhat * k_x + k_0
        tl.store(DX + sample + offs, dx.to(DX.dtype.element_ty), mask=mask)


# ===================================================================================== launching
@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2_at_most(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


_PLAN_OVERRIDE: dict = {}


@contextlib.contextmanager
def plan_override(**tiles):
    """Force tile sizes (BLOCK_C, BLOCK_S, CHUNKS = spatial chunks per sample, BLOCK_CG, BLOCK_K) inside the block.

    For tests: the interpreter's default plan is one program per sample, which would leave the multi-chunk
    merging and the channel-block loops that the GPU plans use untested on the CPU.
    """
    global _PLAN_OVERRIDE
    saved, _PLAN_OVERRIDE = _PLAN_OVERRIDE, dict(tiles)
    try:
        yield
    finally:
        _PLAN_OVERRIDE = saved


class _Plan:
    """Tile shapes and the spatial chunking of one (shape, layout) problem; shared by every launch of a call."""

    __slots__ = ("N", "C", "HW", "G", "CG", "strides", "BLOCK_C", "BLOCK_S", "CHUNK", "K", "n_cblocks",
                 "num_warps", "BLOCK_CG", "BLOCK_K")

    def __init__(self, x: torch.Tensor, num_groups: int):
        N, C = x.shape[0], x.shape[1]
        HW = x.numel() // max(N * C, 1)
        self.N, self.C, self.HW, self.G, self.CG = N, C, HW, num_groups, C // num_groups
        s_s = x.stride(-1) if x.dim() > 2 else 1
        self.strides = (x.stride(0), x.stride(1), s_s)
        channels_last = x.dim() > 2 and HW > 1 and C > 1 and x.stride(1) == 1
        np2 = triton.next_power_of_2
        if _INTERPRET:  # the CPU interpreter runs programs one after another: few, large tiles
            block_s = min(np2(HW), 4096)
            block_c = min(np2(C), max(1, 16384 // block_s))
            target = 1
        elif channels_last:  # channels contiguous: wide channel tiles, rows of spatial positions
            divisor = C & -C  # largest power of two dividing C: no masked lanes when it is >= 16
            block_c = min(128, divisor) if divisor >= 16 else min(np2(C), 128)
            block_s = min(np2(HW), max(1, 4096 // block_c))
            target = 4 * _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
        else:  # spatial contiguous: long rows of one or a few channels
            block_s = min(np2(HW), 1024)
            block_c = min(np2(C), max(1, 4096 // block_s))
            target = 4 * _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
        o = _PLAN_OVERRIDE
        block_c, block_s = o.get("BLOCK_C", block_c), o.get("BLOCK_S", block_s)
        self.BLOCK_C, self.BLOCK_S = block_c, block_s
        self.n_cblocks = triton.cdiv(C, block_c)
        k = max(1, min(triton.cdiv(target, max(N * self.n_cblocks, 1)), triton.cdiv(HW, block_s)))
        k = o.get("CHUNKS", k)
        self.CHUNK = triton.cdiv(triton.cdiv(HW, k), block_s) * block_s
        self.K = triton.cdiv(HW, self.CHUNK)
        self.num_warps = 8 if block_c * block_s >= 4096 else 4
        self.BLOCK_CG = o.get("BLOCK_CG", min(np2(self.CG), 256))
        self.BLOCK_K = o.get("BLOCK_K", max(1, min(np2(self.K), 2048 // self.BLOCK_CG)))

    @property
    def grid(self):
        return (self.K, self.n_cblocks, self.N)


def _or(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return t if t is not None else dummy


def group_norm_forward(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       temb: torch.Tensor | None, eps: float, act: bool, out: torch.Tensor):
    """Fill `out` (same shape and strides as x) with act(GroupNorm(x + temb)); returns fp32 (mean, rstd) [N, G].

    x must be dense NCHW (contiguous) or dense channels-last; temb, if given, is contiguous [N, C].
    """
    p = _Plan(x, num_groups)
    f32 = dict(device=x.device, dtype=torch.float32)
    pmean = torch.empty((p.N, p.K, p.C), **f32)
    pm2 = torch.empty((p.N, p.K, p.C), **f32)
    mean = torch.empty((p.N, p.G), **f32)
    rstd = torch.empty((p.N, p.G), **f32)
    coef_a = torch.empty((p.N, p.C), **f32)
    coef_s = torch.empty((p.N, p.C), **f32)
    _gn_stats[p.grid](x, pmean, pm2, p.C, p.HW, p.K, p.CHUNK, *p.strides,
                      BLOCK_C=p.BLOCK_C, BLOCK_S=p.BLOCK_S, num_warps=p.num_warps)
    _gn_finalize[(p.N * p.G,)](pmean, pm2, _or(temb, x), _or(weight, x), _or(bias, x), mean, rstd, coef_a, coef_s,
                               p.C, p.HW, p.G, p.CG, p.K, p.CHUNK, float(eps),
                               HAS_TEMB=temb is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                               BLOCK_K=p.BLOCK_K, BLOCK_CG=p.BLOCK_CG, num_warps=4)
    _gn_apply[p.grid](x, out, coef_a, coef_s, p.C, p.HW, p.CHUNK, *p.strides,
                      ACT=bool(act), BLOCK_C=p.BLOCK_C, BLOCK_S=p.BLOCK_S, num_warps=p.num_warps)
    return mean, rstd


def group_norm_backward(dy: torch.Tensor, x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, temb: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                        act: bool, dx: torch.Tensor):
    """Fill `dx` (x's strides; dy must have them too); returns fp32 (dweight [C], dbias [C], dtemb [N, C]),
    each None when the corresponding input is None."""
    p = _Plan(x, num_groups)
    f32 = dict(device=x.device, dtype=torch.float32)
    pa = torch.empty((p.N, p.K, p.C), **f32)
    pb = torch.empty((p.N, p.K, p.C), **f32)
    px = torch.empty((p.N, p.K, p.C), **f32) if temb is not None else pa  # unused without temb
    c1 = torch.empty((p.N, p.G), **f32)
    c2 = torch.empty((p.N, p.G), **f32)
    sa = torch.empty((p.N, p.C), **f32)
    sb = torch.empty((p.N, p.C), **f32)
    dtemb = torch.empty((p.N, p.C), **f32) if temb is not None else None
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_TEMB=temb is not None)
    _gn_bwd_reduce[p.grid](x, dy, mean, rstd, _or(weight, x), _or(bias, x), _or(temb, x), pa, pb, px,
                           p.C, p.HW, p.G, p.CG, p.K, p.CHUNK, *p.strides, ACT=bool(act), **flags,
                           BLOCK_C=p.BLOCK_C, BLOCK_S=p.BLOCK_S, num_warps=p.num_warps)
    _gn_bwd_finalize[(p.N * p.G,)](pa, pb, px, rstd, _or(weight, x), c1, c2, sa, sb, _or(dtemb, sa),
                                   p.C, p.HW, p.G, p.CG, p.K, HAS_W=weight is not None, HAS_TEMB=temb is not None,
                                   BLOCK_K=p.BLOCK_K, BLOCK_CG=p.BLOCK_CG, num_warps=4)
    _gn_bwd_apply[p.grid](x, dy, dx, mean, rstd, _or(weight, x), _or(bias, x), _or(temb, x), c1, c2,
                          p.C, p.HW, p.G, p.CG, p.CHUNK, *p.strides, ACT=bool(act), **flags,
                          BLOCK_C=p.BLOCK_C, BLOCK_S=p.BLOCK_S, num_warps=p.num_warps)
    dweight = sb.sum(0) if weight is not None else None
    dbias = sa.sum(0) if bias is not None else None
    return dweight, dbias, dtemb
