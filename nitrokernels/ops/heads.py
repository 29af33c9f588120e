"""`head_levels` / `head_stack`: every sampled discriminator head of one or several feature levels, forward and
backward, one launch per kernel type per layer depth whatever the number of levels.

    out = nitrokernels.ops.head_levels(features, conv_weights, conv_biases, norm_weights, norm_biases,
                                       final_weights, final_biases, ids, counts, row_offsets=None,
                                       num_groups=32, eps=1e-5)
    out = nitrokernels.ops.head_stack(feature, conv_weights, conv_biases, norm_weights, norm_biases,
                                      final_weight, final_bias, ids, num_groups=32, eps=1e-5)

head_levels takes one entry per level: features[l] [B, C_l, S_l, S_l] and level l's pooled parameters
(conv_weights[l][d] ..., final_weights[l], final_biases[l]); level l's sampled heads are the pool rows
ids[o_l : o_l + counts[l]] - row_offsets[l] (o_l = sum(counts[:l]); counts are host ints, so nothing is
read back from the device; row_offsets default to 0 and let a caller such as HeadPool pass global head ids
as they are). Levels may differ in channels, size and depth, and may have no sampled head; at every depth
the levels deep enough share one width, and all final layers have one shape (the map after the convs and
the final conv). out: [sum(counts), B] (global) or [sum(counts), B, S', S'] (local), rows in `ids` order.
head_stack is the one-level case (ids are rows of its pool); it runs the same op and kernels.

One level: feature [B, C, S, S] (any memory layout) is shared by all its sampled heads. Layer d of head
ids[i] is Conv4x4/s2/p1 (conv_weights[d][ids[i]] [O_d, I_d, 4, 4], conv_biases[d][ids[i]]) ->
GroupNorm(num_groups) with per-head affine (norm_weights[d][ids[i]], norm_biases[d][ids[i]]) -> SiLU; then
the final conv final_weight[ids[i]] [1, O, k, k] + final_bias[ids[i]] [1]: k > 1 is a valid conv on the
k x k map (global head; the map after the convs must be exactly k x k) -> out [h, B]; k == 1 is a 1x1 conv
(local head) -> out [h, B, S', S'] with S' = S // 2**len(conv_weights). Each stride-2 conv maps S to S // 2
(torch's rule). The definition is `reference.head_stack_loop_reference`, level by level.

Gradients: every feature gets a dense gradient summed over its level's heads (in the feature's memory layout;
none for a level without sampled heads); every pooled
parameter [P, ...] that requires grad gets a SPARSE COO gradient [P, ...] with indices = the rows (call order,
uncoalesced: a repeated id appears twice and sums on coalesce) and values = the per-sampled-head gradients
(parameter dtype), so unsampled heads get no entries and no dense [P, ...] zero tensor is ever made; across
backward calls autograd accumulates them into param.grad (still sparse, uncoalesced). Inputs that do not
require grad are skipped (no feature gradient GEMM when the feature is detached). Backward picks its backend
by the same rule as forward, at backward time: both backends save the same tensors, so they can mix.

Kept for backward: every layer's pre-norm conv output Y_d [h, B, S_d, S_d, O_d] (channels-last per head,
input dtype) and its GroupNorm (mean, rstd) [H_d, B, G, 2] and folded affine [H_d, B, 2, O_d] (fp32, all
levels of a depth stacked) -- about a third of what the autograd loop keeps (conv input, GroupNorm input
and output per layer) -- and, for a feature that is not channels-last, its channels-last copy (made once per
step: the forward's layer-1 GEMM and the backward's weight gradient both read it). Normalised + SiLU
activations are made once per layer where they are needed (forward: the next layer's input; backward: each
deeper layer's weight-gradient input) and not kept; SiLU' and x-hat are recomputed in the backward epilogues.
Conv weights may have any strides: the Triton kernels read the GEMM layout [P, 4, 4, I, O] (output channels
contiguous, 16-byte loads) by pool row. A [P, O, I, 4, 4] view of such storage -- `w.permute(0, 4, 3, 1, 2)` of a
[P, 4, 4, I, O] tensor, which is how HeadPool stores its weights -- costs nothing; a weight in another layout
(e.g. a plain contiguous [P, O, I, 4, 4] tensor) is converted once per call (a copy of the pooled tensor). The
weight gradients' sparse values are [h, 4, 4, I, O] tensors seen as [h, O, I, 4, 4] (a permuted view).

Backends (see ops.dispatch; the dispatch name is "head_stack" for both ops): "triton" (kernels/heads.py:
grouped implicit-GEMM kernels over all levels at once, weights gathered by id inside the kernels, GroupNorm
statistics in the conv epilogues, normalise+SiLU fused into the next layer's loads; no host syncs, so a
fixed head count is CUDA-graph capturable) and "eager" (per level, the batched eager form: one conv with
concatenated gathered weights, grouped convs, GroupNorm over h*num_groups groups).

Why torch.library ops with register_autograd (not an autograd.Function): register_autograd accepts a sparse
COO gradient for a dense input and autograd accumulates it into param.grad across backward calls (checked
in tests/test_heads_ops.py), and the ops are opaque to torch.compile (fullgraph, no graph break).

ids out of range: on the CPU a clear IndexError before any kernel runs. On a GPU checking would need a
host sync, so instead one `torch._assert_async` over all levels raises a device-side assert (no sync,
graph-capturable; its per-level bounds are cached on the device per (counts, offsets, pool sizes), so the
first call of a new head count must run before a graph capture, as warm-up does) and the kernels clamp the
id for memory safety and write NaN for that head. Set NITROKERNELS_CHECK_IDS=1 to get the same IndexError
on a GPU at the price of a sync.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Sequence

import torch
from torch import Tensor

from nitrokernels.ops import reference
from nitrokernels.ops.dispatch import dispatched_op
from nitrokernels.kernels.plan import level_order

__all__ = ["head_levels", "head_stack", "HEAD_STACK"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

HEAD_STACK = dispatched_op(
    "head_stack",
    "All sampled discriminator heads of one feature level: [Conv4x4/s2 -> GroupNorm -> SiLU]* -> final conv.")


# ============================================================================================= checks
def _describe(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def _validate(feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight, final_bias, ids,
              num_groups, eps, where="head_stack") -> dict:
    """Check shapes, dtypes and devices (no data is read). Returns the derived sizes."""
    def fail(msg):
        raise ValueError(f"{where}: {msg}")

    if not isinstance(feature, Tensor) or feature.dim() != 4:
        fail(f"feature must be a 4-D tensor [B, C, S, S], got {_describe(feature) if isinstance(feature, Tensor) else type(feature)}")
    if feature.dtype not in _DTYPES:
        raise TypeError(f"{where}: feature dtype {feature.dtype} is not supported (float16, bfloat16, float32, float64)")
    batch, channels, size, width = feature.shape
    if size != width:
        fail(f"feature must be square [B, C, S, S], got {tuple(feature.shape)}")
    if not isinstance(ids, Tensor) or ids.dim() != 1:
        fail(f"ids must be a 1-D tensor of pool indices, got {_describe(ids) if isinstance(ids, Tensor) else type(ids)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where}: ids must be an int64 (or int32) tensor, got {ids.dtype}")
    if ids.device != feature.device:
        fail(f"ids are on {ids.device} but the feature is on {feature.device}; keep the ids on the feature's device")
    lists = {"conv_weights": conv_weights, "conv_biases": conv_biases, "norm_weights": norm_weights,
             "norm_biases": norm_biases}
    depth = len(conv_weights)
    if depth < 1:
        fail("conv_weights is empty: a head needs at least one Conv4x4/s2 layer")
    for name, seq in lists.items():
        if len(seq) != depth:
            fail(f"{name} has {len(seq)} tensors but conv_weights has {depth}")
    if not isinstance(num_groups, int) or num_groups < 1:
        fail(f"num_groups must be a positive int, got {num_groups!r}")
    if not eps > 0:
        fail(f"eps must be > 0, got {eps!r}")

    named = [("final_weight", final_weight), ("final_bias", final_bias)]
    for name, seq in lists.items():
        named += [(f"{name}[{d}]", t) for d, t in enumerate(seq)]
    for name, t in named:
        if not isinstance(t, Tensor):
            fail(f"{name} must be a tensor, got {type(t)}")
        if t.dtype != feature.dtype:
            raise TypeError(f"{where}: {name} is {t.dtype} but the feature is {feature.dtype}; "
                            "all parameters must have the feature's dtype")
        if t.device != feature.device:
            fail(f"{name} is on {t.device} but the feature is on {feature.device}")

    pool = conv_weights[0].shape[0] if conv_weights[0].dim() == 5 else -1
    c_in, s = channels, size
    sizes = []
    for d in range(depth):
        w = conv_weights[d]
        if w.dim() != 5 or w.shape[0] != pool or w.shape[2] != c_in or tuple(w.shape[3:]) != (4, 4):
            fail(f"conv_weights[{d}] must be [P={pool}, O, {c_in}, 4, 4] (input channels "
                 f"{'= feature channels' if d == 0 else f'= conv_weights[{d - 1}] output channels'}), got {tuple(w.shape)}")
        c_out = w.shape[1]
        for name in ("conv_biases", "norm_weights", "norm_biases"):
            t = lists[name][d]
            if tuple(t.shape) != (pool, c_out):
                fail(f"{name}[{d}] must be [{pool}, {c_out}], got {tuple(t.shape)}")
        if c_out % num_groups:
            fail(f"num_groups={num_groups} does not divide layer {d}'s {c_out} channels")
        if s // 2 < 1:
            fail(f"feature size {size} is too small for {depth} stride-2 convs (layer {d} input is {s}x{s})")
        s //= 2
        sizes.append(s)
        c_in = c_out
    if final_weight.dim() != 5 or final_weight.shape[0] != pool or final_weight.shape[1] != 1 \
            or final_weight.shape[2] != c_in or final_weight.shape[3] != final_weight.shape[4]:
        fail(f"final_weight must be [P={pool}, 1, {c_in}, k, k], got {tuple(final_weight.shape)}")
    if tuple(final_bias.shape) != (pool, 1):
        fail(f"final_bias must be [{pool}, 1], got {tuple(final_bias.shape)}")
    k = final_weight.shape[-1]
    if k != 1 and s != k:
        fail(f"a {k}x{k} final conv (global head) needs a {k}x{k} map, but {depth} stride-2 convs reduce the "
             f"{size}x{size} feature to {s}x{s} (use S = {k} * 2**{depth}, or k = 1 for a local head)")
    return {"h": ids.shape[0], "batch": batch, "pool": pool, "sizes": sizes, "k": k,
            "channels": [w.shape[1] for w in conv_weights]}


def _validate_levels(features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights, final_biases,
                     ids, counts, row_offsets, num_groups, eps, where="head_levels") -> list[dict]:
    """Every level checked like one head_stack call, plus what one launch per depth needs: a common batch,
    dtype and device, and at every depth one output-channel count and one final map / final conv shape."""
    def fail(msg):
        raise ValueError(f"{where}: {msg}")

    n = len(features)
    if n < 1:
        fail("features is empty")
    for name, seq in (("conv_weights", conv_weights), ("conv_biases", conv_biases), ("norm_weights", norm_weights),
                      ("norm_biases", norm_biases), ("final_weights", final_weights), ("final_biases", final_biases),
                      ("counts", counts), ("row_offsets", row_offsets)):
        if len(seq) != n:
            fail(f"{name} has {len(seq)} entries for {n} levels")
    if not isinstance(ids, Tensor) or ids.dim() != 1:
        fail(f"ids must be a 1-D tensor of pool indices, got {_describe(ids) if isinstance(ids, Tensor) else type(ids)}")
    if any(int(c) < 0 for c in counts) or sum(int(c) for c in counts) != ids.shape[0]:
        fail(f"counts {list(counts)} must be >= 0 and sum to the {ids.shape[0]} ids")
    infos, start = [], 0
    for l in range(n):
        level = where if n == 1 else f"{where}: level {l}"
        ids_l = ids[start:start + int(counts[l])]
        start += int(counts[l])
        infos.append(_validate(features[l], conv_weights[l], conv_biases[l], norm_weights[l], norm_biases[l],
                               final_weights[l], final_biases[l], ids_l, num_groups, eps, where=level))
    first = features[0]
    for l, (f, info) in enumerate(zip(features, infos)):
        if f.dtype != first.dtype or f.device != first.device or info["batch"] != infos[0]["batch"]:
            fail(f"features[{l}] is {_describe(f)} but features[0] is {_describe(first)}: one batch, dtype and device")
        for d, c in enumerate(info["channels"]):
            ref = next(i for i in infos if len(i["channels"]) > d)["channels"][d]
            if c != ref:
                fail(f"layer {d} of level {l} has {c} output channels, another level {ref}: the levels' layers "
                     "at one depth run in one launch and must have the same width")
        if (info["k"], info["sizes"][-1], final_weights[l].shape[2]) != \
                (infos[0]["k"], infos[0]["sizes"][-1], final_weights[0].shape[2]):
            fail(f"level {l}'s final conv {tuple(final_weights[l].shape[1:])} on a {info['sizes'][-1]}x"
                 f"{info['sizes'][-1]} map differs from level 0's: all levels' final layers run in one launch")
    return infos


def _check_arguments(features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights, final_biases,
                     counts, row_offsets, num_groups, eps, where="head_levels") -> None:
    """What must hold before the per-level lists are flattened and the scalars converted (after that a wrong
    count of tensors would be re-cut silently, num_groups=2.5 would become 2): the nesting of every per-level
    list matches conv_weights', and num_groups / eps / counts / row_offsets have their types."""
    def fail(msg):
        raise ValueError(f"{where}: {msg}")

    for name, seq in (("features", features), ("conv_weights", conv_weights), ("conv_biases", conv_biases),
                      ("norm_weights", norm_weights), ("norm_biases", norm_biases), ("final_weights", final_weights),
                      ("final_biases", final_biases), ("counts", counts)):
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence):
            fail(f"{name} must be a list (one entry per level), got {type(seq).__name__}")
    n = len(features)
    for name, seq in (("conv_weights", conv_weights), ("conv_biases", conv_biases), ("norm_weights", norm_weights),
                      ("norm_biases", norm_biases), ("final_weights", final_weights), ("final_biases", final_biases),
                      ("counts", counts)):
        if len(seq) != n:
            fail(f"{name} has {len(seq)} entries for {n} levels (features)")
    for l in range(n):
        if isinstance(conv_weights[l], Tensor) or not isinstance(conv_weights[l], Sequence):
            fail(f"conv_weights[{l}] must be a list of per-layer tensors, got {type(conv_weights[l]).__name__}")
        depth = len(conv_weights[l])
        for name, seq in (("conv_biases", conv_biases), ("norm_weights", norm_weights), ("norm_biases", norm_biases)):
            if isinstance(seq[l], Tensor) or not isinstance(seq[l], Sequence) or len(seq[l]) != depth:
                found = f"{len(seq[l])} tensors" if isinstance(seq[l], Sequence) and not isinstance(seq[l], Tensor) \
                    else type(seq[l]).__name__
                fail(f"{name} has {found} at level {l} ({name}[{l}]) but conv_weights[{l}] has {depth} layer(s)")
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups < 1:
        fail(f"num_groups must be a positive int, got {num_groups!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or not eps > 0:
        fail(f"eps must be a finite number > 0, got {eps!r}")
    for name, seq in (("counts", counts), ("row_offsets", row_offsets if row_offsets is not None else [])):
        for i, c in enumerate(seq):
            if isinstance(c, bool) or not isinstance(c, (numbers.Integral, Tensor)) or \
                    (isinstance(c, Tensor) and (c.numel() != 1 or c.is_floating_point())):
                fail(f"{name}[{i}] must be an int, got {c!r}")


_BOUNDS: dict = {}


def _check_ids_range(ids: Tensor, counts, row_offsets, pools, where="head_stack") -> None:
    """Level l's ids must lie in [row_offsets[l], row_offsets[l] + pools[l]). CPU (or NITROKERNELS_CHECK_IDS=1):
    an IndexError. GPU: one device-side assert over all levels (no sync); its bounds depend only on the
    counts, so they are cached on the device (the first call of a shape must come before a graph capture)."""
    if ids.numel() == 0:
        return
    if ids.device.type == "cpu" or os.environ.get("NITROKERNELS_CHECK_IDS", "0") not in ("", "0"):
        start = 0
        for l, (c, r, p) in enumerate(zip(counts, row_offsets, pools)):
            part = ids[start:start + c]
            start += c
            if not part.numel():
                continue
            lo, hi = int(part.min()) - r, int(part.max()) - r
            if lo < 0 or hi >= p:
                level = "" if len(counts) == 1 else f" (level {l}, minus its row offset {r})"
                raise IndexError(f"{where}: ids{level} must lie in [0, {p}) (the pool size), got min {lo}, max {hi}")
        return
    key = (tuple(counts), tuple(row_offsets), tuple(pools), ids.device)
    if key not in _BOUNDS:
        reps = torch.tensor(counts)
        lo = torch.repeat_interleave(torch.tensor(row_offsets, dtype=torch.long), reps)
        hi = lo + torch.repeat_interleave(torch.tensor(pools, dtype=torch.long), reps)
        _BOUNDS[key] = (lo.to(ids.device), hi.to(ids.device))
    lo, hi = _BOUNDS[key]
    torch._assert_async(((ids >= lo) & (ids < hi)).all(), f"{where}: ids out of range of their level's pool")


def _triton_reasons(features, *args, **kwargs) -> list[str]:
    first = features if isinstance(features, Tensor) else features[0]
    if first.dtype == torch.float64:
        return ["float64 is not supported by the Triton kernels (use fp32/fp16/bf16; eager runs float64)"]
    return []


# ============================================================================================ eager
def _saved_layout(y: Tensor, h: int) -> Tensor:
    """[B, h*O, S, S] (batched eager) -> [h, B, S, S, O] contiguous (the op's saved-activation layout)."""
    batch, _, s, _ = y.shape
    return y.view(batch, h, -1, s, s).permute(1, 0, 3, 4, 2).contiguous()


def _eager_forward(feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight, final_bias, ids,
                   num_groups, eps):
    h = ids.numel()
    ids_c = ids.long().clamp(0, conv_weights[0].shape[0] - 1)
    with torch.no_grad():
        out, pre = reference.head_stack_batched_eager(feature, conv_weights, conv_biases, norm_weights, norm_biases,
                                                      final_weight, final_bias, ids_c, num_groups, eps,
                                                      return_intermediates=True)
        ys, stats = [], []
        for y in pre:
            batch = y.shape[0]
            var, mean = torch.var_mean(y.float().reshape(batch, h, num_groups, -1), dim=-1, unbiased=False)
            stats.append(torch.stack((mean, torch.rsqrt(var + eps)), -1).transpose(0, 1).contiguous())
            ys.append(_saved_layout(y, h))
    return out.contiguous(), ys, stats


def _eager_backward(grad_out, feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight,
                    final_bias, ids, ys, stats, num_groups, eps, need_feature_grad=True, need_param_grads=True):
    """Layer by layer from the saved pre-norm outputs, with torch's own backward kernels (batched layout).

    (Autograd cannot be used here: a custom op's implementation runs below the autograd dispatch key.)
    """
    h = ids.numel()
    ids_c = ids.long().clamp(0, conv_weights[0].shape[0] - 1)
    depth = len(conv_weights)
    batch = feature.shape[0]
    aten = torch.ops.aten

    def gathered(t):
        return t.index_select(0, ids_c)

    def batched(d):      # Y_d in the batched [B, h*O, S, S] layout
        y = ys[d].permute(1, 0, 4, 2, 3)
        return y.reshape(batch, -1, *y.shape[3:]).contiguous()

    def activation(d):   # (Y_d, a_d = silu(group_norm(Y_d)), mean, rstd, gamma) in the batched layout
        y = batched(d)
        gamma = gathered(norm_weights[d]).reshape(-1)
        u, mean, rstd = aten.native_group_norm(y, gamma, gathered(norm_biases[d]).reshape(-1), batch, y.shape[1],
                                               y.shape[2] * y.shape[3], h * num_groups, eps)
        return y, u, mean, rstd, gamma

    def norm_silu_backward(g_a, d, y, u, mean, rstd, gamma):
        sig = torch.sigmoid(u)
        g_u = g_a * (sig * (1 + u * (1 - sig)))
        g_y, g_g, g_b = aten.native_group_norm_backward(g_u, y, mean, rstd, gamma, batch, y.shape[1],
                                                        y.shape[2] * y.shape[3], h * num_groups,
                                                        [True, need_param_grads, need_param_grads])
        per_head = (lambda t: t.view(h, -1)) if need_param_grads else (lambda t: None)
        return g_y, per_head(g_g), per_head(g_b)

    def conv_backward(g_y, x, w, groups, stride, padding, need_input):
        w_cat = w.reshape(-1, *w.shape[2:])
        g_x, g_w, g_b = aten.convolution_backward(g_y, x, w_cat, [w_cat.shape[0]], [stride] * 2, [padding] * 2,
                                                  [1, 1], False, [0, 0], groups,
                                                  [need_input, need_param_grads, need_param_grads])
        if need_param_grads:
            g_w, g_b = g_w.view(w.shape), g_b.view(h, -1)
        return g_x, g_w, g_b

    g_w, g_b, g_gamma, g_beta = [None] * depth, [None] * depth, [None] * depth, [None] * depth
    y, u, mean, rstd, gamma = activation(depth - 1)
    a = torch.nn.functional.silu(u)
    wf = gathered(final_weight)                                             # [h, 1, I, k, k]
    gz = grad_out.reshape(h, batch, a.shape[2] - wf.shape[-1] + 1, -1).transpose(0, 1).contiguous()
    g_a, g_wf, g_bf = conv_backward(gz, a, wf, h, 1, 0, True)
    g_y, g_gamma[-1], g_beta[-1] = norm_silu_backward(g_a, depth - 1, y, u, mean, rstd, gamma)
    g_feature = None
    for d in range(depth - 1, -1, -1):
        w = gathered(conv_weights[d])
        if d == 0:
            if need_feature_grad or need_param_grads:
                g_feature, g_w[0], g_b[0] = conv_backward(g_y, feature, w, 1, 2, 1, need_feature_grad)
        else:
            y, u, mean, rstd, gamma = activation(d - 1)
            g_a, g_w[d], g_b[d] = conv_backward(g_y, torch.nn.functional.silu(u), w, h, 2, 1, True)
            g_y, g_gamma[d - 1], g_beta[d - 1] = norm_silu_backward(g_a, d - 1, y, u, mean, rstd, gamma)
    return g_feature, g_w, g_b, g_gamma, g_beta, g_wf, g_bf


def _level_ids(ids: Tensor, counts, row_offsets, l: int) -> Tensor:
    """Pool rows of level l's heads: ids[o_l : o_l + counts[l]] - row_offsets[l] (int64)."""
    start = sum(counts[:l])
    return ids[start:start + counts[l]].long() - row_offsets[l]


def _affine(stats: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """GroupNorm folded per (head, sample, channel): a = silu(y * scale + shift); [h, B, 2, O] fp32."""
    h, batch, groups, _ = stats.shape
    cpg = gamma.shape[1] // groups
    scale = stats[..., 1:2] * gamma.view(h, 1, groups, cpg)
    shift = beta.view(h, 1, groups, cpg) - stats[..., 0:1] * scale
    return torch.stack((scale.reshape(h, batch, -1), shift.reshape(h, batch, -1)), 2)


def _eager_levels_forward(features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights,
                          final_biases, ids, counts, row_offsets, num_groups, eps):
    """The batched eager form per level, assembled into the layout of kernels.heads.levels_forward."""
    order, _ = level_order(counts, [len(w) for w in conv_weights])
    outs, ys, per_level = {}, [], {}
    for l, feature in enumerate(features):
        if counts[l] == 0:
            ys.append([feature.new_empty((0, feature.shape[0], *y.shape[2:])) for y in _fake_ys(feature, conv_weights[l])])
            continue
        rows = _level_ids(ids, counts, row_offsets, l)
        outs[l], ys_l, stats_l = _eager_forward(feature, conv_weights[l], conv_biases[l], norm_weights[l],
                                                norm_biases[l], final_weights[l], final_biases[l], rows,
                                                num_groups, eps)
        ys.append(ys_l)
        rows_c = rows.clamp(0, conv_weights[l][0].shape[0] - 1)
        per_level[l] = [(st, _affine(st, norm_weights[l][d].index_select(0, rows_c).float(),
                                     norm_biases[l][d].index_select(0, rows_c).float()))
                        for d, st in enumerate(stats_l)]
    dmax = max((len(conv_weights[l]) for l in order), default=0)
    stats = [torch.cat([per_level[l][d][0] for l in order if len(per_level[l]) > d]) for d in range(dmax)]
    affine = [torch.cat([per_level[l][d][1] for l in order if len(per_level[l]) > d]) for d in range(dmax)]
    out = torch.cat([outs[l] for l in range(len(features)) if l in outs])
    return out, ys, stats, affine


def _fake_ys(feature, conv_weights):
    s = feature.shape[2]
    out = []
    for w in conv_weights:
        s //= 2
        out.append(feature.new_empty((0, 1, s, s, w.shape[1])))
    return out


def _eager_levels_backward(grad_out, features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights,
                           final_biases, ids, counts, row_offsets, ys, stats, affine, num_groups, eps,
                           need_feature_grads, need_param_grads, inputs_cl=None):
    """Per level with torch's backward kernels, assembled like kernels.heads.levels_backward's results."""
    order, first = level_order(counts, [len(w) for w in conv_weights])
    nlev = len(features)
    g_features = [None] * nlev
    g_w = [[None] * len(conv_weights[l]) for l in range(nlev)]
    per_level, g_wf, g_bf = {}, [], []
    for l in range(nlev):
        if counts[l] == 0:
            continue
        start, h = sum(counts[:l]), counts[l]
        stats_l = [st[first[l]:first[l] + h] for st in stats[:len(conv_weights[l])]]
        gx, gw, gb, gg, gbe, gwf, gbf = _eager_backward(
            grad_out[start:start + h], features[l], conv_weights[l], conv_biases[l], norm_weights[l], norm_biases[l],
            final_weights[l], final_biases[l], _level_ids(ids, counts, row_offsets, l), ys[l], stats_l, num_groups,
            eps, need_feature_grad=need_feature_grads[l], need_param_grads=need_param_grads)
        g_features[l] = gx if need_feature_grads[l] else None
        if need_param_grads:
            g_w[l] = [g.permute(0, 3, 4, 2, 1).contiguous() for g in gw]     # -> the GEMM layout [h, 4, 4, I, O]
            per_level[l] = (gb, gg, gbe)
            g_wf.append(gwf)
            g_bf.append(gbf)
    dmax = len(stats)
    if not need_param_grads:
        return g_features, g_w, [None] * dmax, [None] * dmax, [None] * dmax, None, None
    stacked = [[torch.cat([per_level[l][i][d] for l in order if len(conv_weights[l]) > d]) for d in range(dmax)]
               for i in range(3)]
    return g_features, g_w, *stacked, torch.cat(g_wf), torch.cat(g_bf)


def _triton_levels_forward(*args):
    from nitrokernels.kernels import heads as kernels   # lazy: TRITON_INTERPRET is read at import
    return kernels.levels_forward(*args)


def _triton_levels_backward(*args, **kwargs):
    from nitrokernels.kernels import heads as kernels
    return kernels.levels_backward(*args, **kwargs)


_eager_levels_forward.backward = _eager_levels_backward
_triton_levels_forward.backward = _triton_levels_backward
HEAD_STACK.register("eager")(_eager_levels_forward)
HEAD_STACK.register("triton", check=_triton_reasons)(_triton_levels_forward)


@HEAD_STACK.set_example
def _example(device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pool, hidden = 8, 64

    def r(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)
    conv_w = [r(pool, hidden, 320, 4, 4), r(pool, hidden, hidden, 4, 4), r(pool, hidden, hidden, 4, 4)]
    vecs = [[r(pool, hidden) for _ in range(3)] for _ in range(4)]
    args = ([r(2, 320, 32, 32)], [conv_w], [vecs[0]], [vecs[1]], [vecs[2]], [r(pool, 1, hidden, 4, 4)],
            [r(pool, 1)], torch.arange(4, device=device), [4], [0])
    return args, {"num_groups": 32, "eps": 1e-5}


# ====================================================================================== custom ops
# torch.library schemas have no nested lists: per-level parameter lists travel flattened (level-major),
# cut back by `depths`.
def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _nest(flat: Sequence[Tensor], depths) -> list[list[Tensor]]:
    out, i = [], 0
    for d in depths:
        out.append(list(flat[i:i + d]))
        i += d
    return out


def _unflatten(features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights, final_biases, ids,
               counts, row_offsets, depths):
    return (list(features), *(_nest(t, depths) for t in (conv_weights, conv_biases, norm_weights, norm_biases)),
            list(final_weights), list(final_biases), ids, list(counts), list(row_offsets))


@torch.library.custom_op("nitrokernels::head_levels_fwd", mutates_args=())
def head_levels_fwd(features: list[Tensor], conv_weights: list[Tensor], conv_biases: list[Tensor],
                    norm_weights: list[Tensor], norm_biases: list[Tensor], final_weights: list[Tensor],
                    final_biases: list[Tensor], ids: Tensor, counts: list[int], row_offsets: list[int],
                    depths: list[int], num_groups: int, eps: float
                    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Returns (logits, saved pre-norm outputs ys (level-major, [h_l, B, S_d, S_d, O_d]), saved (mean, rstd)
    [H_d, B, G, 2] and (scale, shift) [H_d, B, 2, O_d] per depth, fp32, levels deepest first, and per level the
    channels-last copy of its feature (0 elements where the feature is channels-last or has no heads): made once
    here, read by the forward and saved for the backward's weight gradient)."""
    args = _unflatten(features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights, final_biases,
                      ids, counts, row_offsets, depths)
    infos = _validate_levels(*args, num_groups, eps, where=_where(features))
    _check_ids_range(ids, args[8], args[9], [i["pool"] for i in infos], where=_where(features))
    if sum(counts) == 0:
        return _fake_forward(features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights,
                             final_biases, ids, counts, row_offsets, depths, num_groups, eps)
    xcl = _channels_last_copies(features, counts)
    args = ([x if x.numel() else f for x, f in zip(xcl, features)], *args[1:])
    with _inputs_dtype(features[0]):
        out, ys, stats, affine = HEAD_STACK(*args, num_groups, eps)
    return out, [y for ys_l in ys for y in ys_l], stats, affine, xcl


def _channels_last_copies(features, counts) -> list[Tensor]:
    """Per level, a channels-last copy of a feature that is not channels-last and has sampled heads, else a
    0-element placeholder. The kernels read features channels-last (layer-1 GEMM and weight gradient): the copy
    is made ONCE per step and saved for the backward instead of being made again there."""
    cl = torch.channels_last
    return [f.contiguous(memory_format=cl) if c > 0 and not f.is_contiguous(memory_format=cl) else _empty(f)
            for f, c in zip(features, counts)]


def _inputs_dtype(like: Tensor):
    """The op computes in its inputs' dtype (the fake impl promises it): an enclosing torch.autocast must not
    recast the eager backend's convs inside it (the Triton kernels ignore autocast anyway)."""
    return torch.autocast(like.device.type, enabled=False)


def _where(features) -> str:
    return "head_stack" if len(features) == 1 else "head_levels"


def _fake_forward(features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights, final_biases, ids,
                  counts, row_offsets, depths, num_groups, eps):
    args = _unflatten(features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights, final_biases,
                      ids, counts, row_offsets, depths)
    infos = _validate_levels(*args, num_groups, eps, where=_where(features))
    batch, k, s_last = infos[0]["batch"], infos[0]["k"], infos[0]["sizes"][-1]
    total = ids.shape[0]
    out = features[0].new_empty((total, batch) if k != 1 else (total, batch, s_last, s_last))
    ys = [features[0].new_empty((c, batch, s, s, o)) for c, info in zip(counts, infos)
          for s, o in zip(info["sizes"], info["channels"])]
    with_heads = [(c, info) for c, info in zip(counts, infos) if c > 0]
    dmax = max((len(info["sizes"]) for _, info in with_heads), default=0)
    heads = [sum(c for c, info in with_heads if len(info["sizes"]) > d) for d in range(dmax)]
    width = [next(info["channels"][d] for _, info in with_heads if len(info["sizes"]) > d) for d in range(dmax)]
    stats = [features[0].new_empty((h, batch, num_groups, 2), dtype=torch.float32) for h in heads]
    affine = [features[0].new_empty((h, batch, 2, w), dtype=torch.float32) for h, w in zip(heads, width)]
    return out, ys, stats, affine, _channels_last_copies(features, counts)


head_levels_fwd.register_fake(_fake_forward)


@torch.library.custom_op("nitrokernels::head_levels_bwd", mutates_args=())
def head_levels_bwd(grad_out: Tensor, features: list[Tensor], conv_weights: list[Tensor], conv_biases: list[Tensor],
                    norm_weights: list[Tensor], norm_biases: list[Tensor], final_weights: list[Tensor],
                    final_biases: list[Tensor], ids: Tensor, counts: list[int], row_offsets: list[int],
                    depths: list[int], ys: list[Tensor], stats: list[Tensor], affine: list[Tensor], num_groups: int,
                    eps: float, need_feature_grads: list[bool], need_param_grads: bool, features_cl: list[Tensor]
                    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], Tensor, Tensor]:
    """Dense per-sampled-head gradients: (d_features per level, dW (level-major) [h_l, 4, 4, I, O] (the GEMM
    layout: output channels contiguous), db / dgamma /
    dbeta per depth [H_d, O] (levels deepest first), dW_final [H, 1, I, k, k], db_final [H, 1] (caller order));
    tensors not asked for (or of levels without heads) come back with 0 elements."""
    args = _unflatten(features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights, final_biases,
                      ids, counts, row_offsets, depths)
    if sum(counts) == 0:
        return _fake_backward(grad_out, features, conv_weights, conv_biases, norm_weights, norm_biases,
                              final_weights, final_biases, ids, counts, row_offsets, depths, ys, stats, affine,
                              num_groups, eps, need_feature_grads, need_param_grads, features_cl)
    impl = HEAD_STACK.select(*args, num_groups, eps)
    with _inputs_dtype(features[0]):
        gx, gw, gb, gg, gbe, gwf, gbf = impl.fn.backward(grad_out, *args, _nest(ys, depths), stats, affine,
                                                         num_groups, eps, list(need_feature_grads), need_param_grads,
                                                         inputs_cl=[x if x.numel() else None for x in features_cl])
    gx = [g if g is not None else _empty(f) for g, f in zip(gx, features)]
    if not need_param_grads:
        gb, gg, gbe = ([_empty(features[0]) for _ in stats] for _ in range(3))    # distinct: no aliased outputs
        return gx, [_empty(f) for f in conv_weights], gb, gg, gbe, _empty(features[0]), _empty(features[0])
    flat_w = [w if w is not None else _gemm_empty(p, 0)                     # levels without heads
              for w, p in zip((w for ws in gw for w in ws), conv_weights)]
    return gx, flat_w, list(gb), list(gg), list(gbe), gwf, gbf


def _gemm_empty(w: Tensor, count: int) -> Tensor:
    """Weight-gradient values of `count` heads of the [P, O, I, 4, 4] conv weight w, in the GEMM layout
    [count, 4, 4, I, O] (contiguous)."""
    return w.new_empty((count, w.shape[3], w.shape[4], w.shape[2], w.shape[1]))


def _fake_backward(grad_out, features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights,
                   final_biases, ids, counts, row_offsets, depths, ys, stats, affine, num_groups, eps,
                   need_feature_grads, need_param_grads, features_cl=None):
    ref = features[0]
    gx = [torch.empty_like(f) if need and c > 0 else _empty(f)
          for f, need, c in zip(features, need_feature_grads, counts)]
    if not need_param_grads:
        return (gx, [_empty(ref) for _ in conv_weights], [_empty(ref) for _ in stats], [_empty(ref) for _ in stats],
                [_empty(ref) for _ in stats], _empty(ref), _empty(ref))
    total = ids.shape[0]
    flat_counts = [c for c, d in zip(counts, depths) for _ in range(d)]
    gw = [_gemm_empty(w, c) for c, w in zip(flat_counts, conv_weights)]
    per_depth = [ref.new_empty((st.shape[0], a.shape[-1])) for st, a in zip(stats, affine)]
    k = final_weights[0].shape[-1]
    return (gx, gw, per_depth, [torch.empty_like(t) for t in per_depth], [torch.empty_like(t) for t in per_depth],
            ref.new_empty((total, 1, final_weights[0].shape[2], k, k)), ref.new_empty((total, 1)))


head_levels_bwd.register_fake(_fake_backward)


def _setup_context(ctx, inputs, output):
    (features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights, final_biases, ids, counts,
     row_offsets, depths, num_groups, eps) = inputs
    _, ys, stats, affine, xcl = output
    ctx.mark_non_differentiable(*ys, *stats, *affine, *xcl)
    ctx.set_materialize_grads(False)
    ctx.need_features = [f.requires_grad for f in features]
    params = [*conv_weights, *conv_biases, *norm_weights, *norm_biases, *final_weights, *final_biases]
    ctx.need_params = [p.requires_grad for p in params]
    ctx.sizes = (len(features), len(conv_weights), len(ys), len(stats))
    ctx.xcl = len(xcl)
    ctx.counts, ctx.row_offsets, ctx.depths = list(counts), list(row_offsets), list(depths)
    ctx.num_groups, ctx.eps = num_groups, eps
    ctx.save_for_backward(ids, *features, *params, *ys, *stats, *affine, *xcl)


def _sparse(values: Tensor, rows: Tensor, param: Tensor) -> Tensor:
    """Per-sampled-head values -> a COO gradient of the pooled parameter (rows = pool rows, uncoalesced)."""
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, param.shape, dtype=param.dtype, device=param.device,
                                   check_invariants=False)


def _backward(ctx, grad_out, _grad_ys, _grad_stats, _grad_affine, _grad_xcl):
    nlev, nconv, nys, nstats = ctx.sizes
    saved = list(ctx.saved_tensors)
    ids, features = saved[0], saved[1:1 + nlev]
    i = 1 + nlev
    conv_w, conv_b, norm_w, norm_b = (saved[i + j * nconv:i + (j + 1) * nconv] for j in range(4))
    i += 4 * nconv
    final_w, final_b = saved[i:i + nlev], saved[i + nlev:i + 2 * nlev]
    i += 2 * nlev
    ys, stats = saved[i:i + nys], saved[i + nys:i + nys + nstats]
    i += nys + nstats
    affine, xcl = saved[i:i + nstats], saved[i + nstats:]
    need_params = any(ctx.need_params)
    lists = [[None] * nconv] * 4
    tail = (None,) * 6                                  # ids, counts, row_offsets, depths, num_groups, eps
    if grad_out is None or not (any(ctx.need_features) or need_params):
        return ([None] * nlev, *lists, [None] * nlev, [None] * nlev, *tail)
    counts, depths = ctx.counts, ctx.depths
    gx, gw, gb, gg, gbe, gwf, gbf = torch.ops.nitrokernels.head_levels_bwd(
        grad_out, features, conv_w, conv_b, norm_w, norm_b, final_w, final_b, ids, counts, ctx.row_offsets, depths,
        ys, stats, affine, ctx.num_groups, ctx.eps, ctx.need_features, need_params, xcl)
    g_features = [g if need and c > 0 else None for g, need, c in zip(gx, ctx.need_features, counts)]
    if not need_params:
        return (g_features, *lists, [None] * nlev, [None] * nlev, *tail)
    # Per level: the sparse gradient rows and the slices of the stacked values (see head_levels_bwd).
    _, first = level_order(counts, depths)
    grads = {name: [] for name in ("w", "b", "g", "be", "wf", "bf")}
    k, start = 0, 0
    for l, (c, depth) in enumerate(zip(counts, depths)):
        rows = (ids[start:start + c].long() - ctx.row_offsets[l]).clamp(0, final_w[l].shape[0] - 1)
        h0 = first.get(l, 0)
        for d in range(depth):
            # values [h, 4, 4, I, O] (GEMM layout) seen as [h, O, I, 4, 4]: no copy; a HeadPool's
            # [P, 4, 4, I, O] parameter gets them back contiguous through the permute's backward
            grads["w"].append(_sparse(gw[k + d].permute(0, 4, 3, 1, 2), rows, conv_w[k + d]))
            for key, stacked, params in (("b", gb, conv_b), ("g", gg, norm_w), ("be", gbe, norm_b)):
                values = stacked[d][h0:h0 + c] if c else params[k + d].new_empty((0, *params[k + d].shape[1:]))
                grads[key].append(_sparse(values, rows, params[k + d]))
        grads["wf"].append(_sparse(gwf[start:start + c], rows, final_w[l]))
        grads["bf"].append(_sparse(gbf[start:start + c], rows, final_b[l]))
        k += depth
        start += c
    params = [*conv_w, *conv_b, *norm_w, *norm_b, *final_w, *final_b]
    flat = [*grads["w"], *grads["b"], *grads["g"], *grads["be"], *grads["wf"], *grads["bf"]]
    flat = [g if need else None for g, need in zip(flat, ctx.need_params)]
    lists = [flat[j * nconv:(j + 1) * nconv] for j in range(4)]
    i = 4 * nconv
    return (g_features, *lists, flat[i:i + nlev], flat[i + nlev:], *tail)


head_levels_fwd.register_autograd(_backward, setup_context=_setup_context)


# ========================================================================================= public
def head_levels(features: Sequence[Tensor], conv_weights: Sequence[Sequence[Tensor]],
                conv_biases: Sequence[Sequence[Tensor]], norm_weights: Sequence[Sequence[Tensor]],
                norm_biases: Sequence[Sequence[Tensor]], final_weights: Sequence[Tensor],
                final_biases: Sequence[Tensor], ids: Tensor, counts: Sequence[int],
                row_offsets: Sequence[int] | None = None, num_groups: int = 32, eps: float = 1e-5) -> Tensor:
    """Logits of the sampled heads of several feature levels in ONE op: [H, B] or [H, B, S', S'], rows in the
    order of `ids`. Level l's heads are rows ids[o_l : o_l + counts[l]] - row_offsets[l] of its pooled
    tensors (o_l = sum(counts[:l]); row_offsets default 0). See the module docstring."""
    _check_arguments(features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights, final_biases,
                     counts, row_offsets, num_groups, eps)
    depths = [len(w) for w in conv_weights]
    row_offsets = [0] * len(features) if row_offsets is None else [int(r) for r in row_offsets]
    out, _, _, _, _ = torch.ops.nitrokernels.head_levels_fwd(
        list(features), [t for ts in conv_weights for t in ts], [t for ts in conv_biases for t in ts],
        [t for ts in norm_weights for t in ts], [t for ts in norm_biases for t in ts], list(final_weights),
        list(final_biases), ids, [int(c) for c in counts], row_offsets, depths, int(num_groups), float(eps))
    return out


def head_stack(feature: Tensor, conv_weights: Sequence[Tensor], conv_biases: Sequence[Tensor],
               norm_weights: Sequence[Tensor], norm_biases: Sequence[Tensor], final_weight: Tensor,
               final_bias: Tensor, ids: Tensor, num_groups: int = 32, eps: float = 1e-5) -> Tensor:
    """Logits of the sampled heads `ids` of one feature level: [h, B] (global, k > 1) or [h, B, S', S']
    (local, k = 1). The one-level case of `head_levels`; see the module docstring."""
    if not isinstance(ids, Tensor) or ids.dim() != 1:
        raise ValueError(f"head_stack: ids must be a 1-D tensor of pool indices, got "
                         f"{_describe(ids) if isinstance(ids, Tensor) else type(ids)}")
    return head_levels([feature], [conv_weights], [conv_biases], [norm_weights], [norm_biases], [final_weight],
                       [final_bias], ids, [ids.shape[0]], None, num_groups, eps)
