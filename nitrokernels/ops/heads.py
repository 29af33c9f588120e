"""`head_stack`: every sampled discriminator head of ONE feature level, forward and backward, in a few launches.

    out = nitrokernels.ops.head_stack(feature, conv_weights, conv_biases, norm_weights, norm_biases,
                                      final_weight, final_bias, ids, num_groups=32, eps=1e-5)

feature [B, C, S, S] (any memory layout) is shared by all sampled heads. Layer d of head ids[i] is
Conv4x4/s2/p1 (conv_weights[d][ids[i]] [O_d, I_d, 4, 4], conv_biases[d][ids[i]]) -> GroupNorm(num_groups)
with per-head affine (norm_weights[d][ids[i]], norm_biases[d][ids[i]]) -> SiLU; then the final conv
final_weight[ids[i]] [1, O, k, k] + final_bias[ids[i]] [1]: k > 1 is a valid conv on the k x k map (global
head; the map after the convs must be exactly k x k) -> out [h, B]; k == 1 is a 1x1 conv (local head) ->
out [h, B, S', S'] with S' = S // 2**len(conv_weights). Each stride-2 conv maps S to S // 2 (torch's rule).
The definition is `reference.head_stack_loop_reference`.

Gradients: `feature` gets a dense gradient summed over heads (in the feature's memory layout); every pooled
parameter [P, ...] that requires grad gets a SPARSE COO gradient [P, ...] with indices = ids (call order,
uncoalesced: a repeated id appears twice and sums on coalesce) and values = the per-sampled-head gradients
(parameter dtype), so unsampled heads get no entries and no dense [P, ...] zero tensor is ever made; across
backward calls autograd accumulates them into param.grad (still sparse, uncoalesced). Inputs that do not
require grad are skipped (no feature gradient GEMM when the feature is detached). Backward picks its backend
by the same rule as forward, at backward time: both backends save the same tensors, so they can mix.

Kept for backward: every layer's pre-norm conv output Y_d [h, B, S_d, S_d, O_d] (channels-last per head,
input dtype) and its GroupNorm (mean, rstd) [h, B, G, 2] fp32 -- about a third of what the autograd loop
keeps (conv input, GroupNorm input and output per layer). Normalised + SiLU activations are recomputed where
they are read (next layer's loads, weight gradients), as are SiLU' and x-hat in the backward epilogues.
NITROKERNELS_HEADS_WEIGHTS=gathered makes the Triton convs read a per-call [h, 4, 4, I, O] copy of the sampled
weights instead of gathering from the pool inside the kernel (see kernels/heads.py: weight_source).

Backends (see ops.dispatch): "triton" (kernels/heads.py: grouped implicit-GEMM kernels, weights gathered by
id inside the kernels, GroupNorm statistics in the conv epilogues, normalise+SiLU fused into the next
layer's loads; no host syncs, so a fixed head count is CUDA-graph capturable) and "eager" (the batched
eager form: one conv with concatenated gathered weights, grouped convs, GroupNorm over h*num_groups groups).

Why torch.library ops with register_autograd (not an autograd.Function): register_autograd accepts a sparse
COO gradient for a dense input and autograd accumulates it into param.grad across backward calls (checked
in tests/test_heads_ops.py), and the ops are opaque to torch.compile (fullgraph, no graph break).

ids out of range: on the CPU a clear IndexError before any kernel runs. On a GPU checking would need a
host sync, so instead `torch._assert_async` raises a device-side assert (no sync, graph-capturable) and the
kernels clamp the id for memory safety and write NaN for that head. Set NITROKERNELS_CHECK_IDS=1 to get the
same IndexError on a GPU at the price of a sync.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from nitrokernels.ops import reference
from nitrokernels.ops.dispatch import dispatched_op

__all__ = ["head_stack", "HEAD_STACK"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

HEAD_STACK = dispatched_op(
    "head_stack",
    "All sampled discriminator heads of one feature level: [Conv4x4/s2 -> GroupNorm -> SiLU]* -> final conv.")


# ============================================================================================= checks
def _describe(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def _validate(feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight, final_bias, ids,
              num_groups, eps) -> dict:
    """Check shapes, dtypes and devices (no data is read). Returns the derived sizes."""
    def fail(msg):
        raise ValueError(f"head_stack: {msg}")

    if not isinstance(feature, Tensor) or feature.dim() != 4:
        fail(f"feature must be a 4-D tensor [B, C, S, S], got {_describe(feature) if isinstance(feature, Tensor) else type(feature)}")
    if feature.dtype not in _DTYPES:
        raise TypeError(f"head_stack: feature dtype {feature.dtype} is not supported (float16, bfloat16, float32, float64)")
    batch, channels, size, width = feature.shape
    if size != width:
        fail(f"feature must be square [B, C, S, S], got {tuple(feature.shape)}")
    if not isinstance(ids, Tensor) or ids.dim() != 1:
        fail(f"ids must be a 1-D tensor of pool indices, got {_describe(ids) if isinstance(ids, Tensor) else type(ids)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"head_stack: ids must be an int64 (or int32) tensor, got {ids.dtype}")
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
            raise TypeError(f"head_stack: {name} is {t.dtype} but the feature is {feature.dtype}; "
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


def _check_ids_range(ids: Tensor, pool: int) -> None:
    if ids.numel() == 0:
        return
    if ids.device.type == "cpu" or os.environ.get("NITROKERNELS_CHECK_IDS", "0") not in ("", "0"):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= pool:
            raise IndexError(f"head_stack: ids must lie in [0, {pool}) (the pool size), got min {lo}, max {hi}")
    else:
        torch._assert_async(((ids >= 0) & (ids < pool)).all(), f"head_stack: ids out of range [0, {pool})")


def _triton_reasons(feature, conv_weights, *args, **kwargs) -> list[str]:
    if feature.dtype == torch.float64:
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


def _triton_forward(*args):
    from nitrokernels.kernels import heads as kernels   # lazy: TRITON_INTERPRET is read at import
    return kernels.head_stack_forward(*args)


def _triton_backward(*args, **kwargs):
    from nitrokernels.kernels import heads as kernels
    return kernels.head_stack_backward(*args, **kwargs)


_eager_forward.backward = _eager_backward
_triton_forward.backward = _triton_backward
HEAD_STACK.register("eager")(_eager_forward)
HEAD_STACK.register("triton", check=_triton_reasons)(_triton_forward)


@HEAD_STACK.set_example
def _example(device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pool, hidden = 8, 64

    def r(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)
    conv_w = [r(pool, hidden, 320, 4, 4), r(pool, hidden, hidden, 4, 4), r(pool, hidden, hidden, 4, 4)]
    vecs = [[r(pool, hidden) for _ in range(3)] for _ in range(4)]
    args = (r(2, 320, 32, 32), conv_w, vecs[0], vecs[1], vecs[2], r(pool, 1, hidden, 4, 4), r(pool, 1),
            torch.arange(4, device=device))
    return args, {"num_groups": 32}


# ====================================================================================== custom ops
def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


@torch.library.custom_op("nitrokernels::head_stack_fwd", mutates_args=())
def head_stack_fwd(feature: Tensor, conv_weights: list[Tensor], conv_biases: list[Tensor],
                   norm_weights: list[Tensor], norm_biases: list[Tensor], final_weight: Tensor, final_bias: Tensor,
                   ids: Tensor, num_groups: int, eps: float) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Returns (logits, saved pre-norm outputs [h, B, S_d, S_d, O_d], saved (mean, rstd) [h, B, G, 2] fp32)."""
    args = (feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight, final_bias, ids,
            num_groups, eps)
    info = _validate(*args)
    _check_ids_range(ids, info["pool"])
    if info["h"] == 0:
        return _fake_forward(*args)
    return HEAD_STACK(*args)


def _fake_forward(feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight, final_bias, ids,
                  num_groups, eps):
    info = _validate(feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight, final_bias, ids,
                     num_groups, eps)
    h, batch, k = info["h"], info["batch"], info["k"]
    s_last = info["sizes"][-1]
    out_shape = (h, batch) if k != 1 else (h, batch, s_last, s_last)
    out = feature.new_empty(out_shape)
    ys = [feature.new_empty((h, batch, s, s, c)) for s, c in zip(info["sizes"], info["channels"])]
    stats = [feature.new_empty((h, batch, num_groups, 2), dtype=torch.float32) for _ in info["sizes"]]
    return out, ys, stats


head_stack_fwd.register_fake(_fake_forward)


@torch.library.custom_op("nitrokernels::head_stack_bwd", mutates_args=())
def head_stack_bwd(grad_out: Tensor, feature: Tensor, conv_weights: list[Tensor], conv_biases: list[Tensor],
                   norm_weights: list[Tensor], norm_biases: list[Tensor], final_weight: Tensor, final_bias: Tensor,
                   ids: Tensor, ys: list[Tensor], stats: list[Tensor], num_groups: int, eps: float,
                   need_feature_grad: bool, need_param_grads: bool
                   ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], Tensor, Tensor]:
    """Dense per-sampled-head gradients: (d_feature, dW_d [h,O,I,4,4], db_d, dgamma_d, dbeta_d [h,O],
    dW_final [h,1,I,k,k], db_final [h,1]); tensors not asked for come back with 0 elements."""
    fwd_args = (feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight, final_bias, ids,
                num_groups, eps)
    if ids.numel() == 0:
        return _fake_backward(grad_out, *fwd_args[:8], ys, stats, num_groups, eps, need_feature_grad,
                              need_param_grads, zero=True)
    impl = HEAD_STACK.select(*fwd_args)
    gx, gw, gb, gg, gbe, gwf, gbf = impl.fn.backward(grad_out, *fwd_args[:8], ys, stats, num_groups, eps,
                                                     need_feature_grad=need_feature_grad,
                                                     need_param_grads=need_param_grads)
    if gx is None:
        gx = _empty(feature)
    if not need_param_grads:
        gw, gb, gg, gbe = ([_empty(feature) for _ in conv_weights] for _ in range(4))
        gwf, gbf = _empty(feature), _empty(feature)
    return gx, list(gw), list(gb), list(gg), list(gbe), gwf, gbf


def _fake_backward(grad_out, feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight,
                   final_bias, ids, ys, stats, num_groups, eps, need_feature_grad, need_param_grads, zero=False):
    h = ids.shape[0]
    new = feature.new_zeros if zero else feature.new_empty
    gx = (torch.zeros_like if zero else torch.empty_like)(feature) if need_feature_grad else _empty(feature)

    def per_head(t):
        return new((h, *t.shape[1:])) if need_param_grads else _empty(feature)
    return (gx, [per_head(t) for t in conv_weights], [per_head(t) for t in conv_biases],
            [per_head(t) for t in norm_weights], [per_head(t) for t in norm_biases],
            per_head(final_weight), per_head(final_bias))


head_stack_bwd.register_fake(_fake_backward)


def _setup_context(ctx, inputs, output):
    feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight, final_bias, ids, num_groups, eps = inputs
    _, ys, stats = output
    ctx.mark_non_differentiable(*ys, *stats)
    ctx.set_materialize_grads(False)
    params = [*conv_weights, *conv_biases, *norm_weights, *norm_biases, final_weight, final_bias]
    ctx.need_feature = feature.requires_grad
    ctx.need_params = [p.requires_grad for p in params]
    ctx.depth = len(conv_weights)
    ctx.num_groups, ctx.eps = num_groups, eps
    ctx.save_for_backward(feature, final_weight, final_bias, ids, *conv_weights, *conv_biases, *norm_weights,
                          *norm_biases, *ys, *stats)


def _sparse(values: Tensor, ids: Tensor, param: Tensor) -> Tensor:
    """Per-sampled-head values -> a COO gradient of the pooled parameter (rows = ids, uncoalesced)."""
    rows = ids.long().clamp(0, param.shape[0] - 1).unsqueeze(0)
    return torch.sparse_coo_tensor(rows, values, param.shape, dtype=param.dtype, device=param.device,
                                   check_invariants=False)


def _backward(ctx, grad_out, _grad_ys, _grad_stats):
    depth = ctx.depth
    saved = ctx.saved_tensors
    feature, final_weight, final_bias, ids = saved[:4]
    rest = saved[4:]
    conv_w, conv_b, norm_w, norm_b = (list(rest[i * depth:(i + 1) * depth]) for i in range(4))
    ys = list(rest[4 * depth:5 * depth])
    stats = list(rest[5 * depth:6 * depth])
    need_params = any(ctx.need_params)
    none_lists = ([None] * depth, [None] * depth, [None] * depth, [None] * depth)
    if grad_out is None or not (ctx.need_feature or need_params):
        return (None, *none_lists, None, None, None, None, None)
    gx, gw, gb, gg, gbe, gwf, gbf = torch.ops.nitrokernels.head_stack_bwd(
        grad_out, feature, conv_w, conv_b, norm_w, norm_b, final_weight, final_bias, ids, ys, stats,
        ctx.num_groups, ctx.eps, ctx.need_feature, need_params)
    params = [*conv_w, *conv_b, *norm_w, *norm_b, final_weight, final_bias]
    values = [*gw, *gb, *gg, *gbe, gwf, gbf]
    sparse = [_sparse(v, ids, p) if need else None for v, p, need in zip(values, params, ctx.need_params)]
    lists = [sparse[i * depth:(i + 1) * depth] for i in range(4)]
    return (gx if ctx.need_feature else None, *lists, sparse[-2], sparse[-1], None, None, None)


head_stack_fwd.register_autograd(_backward, setup_context=_setup_context)


# ========================================================================================= public
def head_stack(feature: Tensor, conv_weights: Sequence[Tensor], conv_biases: Sequence[Tensor],
               norm_weights: Sequence[Tensor], norm_biases: Sequence[Tensor], final_weight: Tensor,
               final_bias: Tensor, ids: Tensor, num_groups: int = 32, eps: float = 1e-5) -> Tensor:
    """Logits of the sampled heads `ids` of one feature level: [h, B] (global, k > 1) or [h, B, S', S']
    (local, k = 1). See the module docstring for the exact semantics and gradients."""
    out, _, _ = torch.ops.nitrokernels.head_stack_fwd(
        feature, list(conv_weights), list(conv_biases), list(norm_weights), list(norm_biases), final_weight,
        final_bias, ids, int(num_groups), float(eps))
    return out
