"""Plain eager references for every fused op: the definition of what each kernel must compute.

Written as plainly as possible (no fusion, no tricks); tests run them in float64. One section per kernel
family; each op module's eager backend calls these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ===================================================================== group norm family (group_norm.py)
def group_norm_silu_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                              bias: torch.Tensor | None = None, eps: float = 1e-5, temb: torch.Tensor | None = None,
                              act: str | None = "silu") -> torch.Tensor:
    """act(GroupNorm(x + temb[:, :, None, ...])): diffusers ResnetBlock2D's `h + temb` -> norm2 -> SiLU.

    temb is [N, C] (broadcast over the spatial dims); act is "silu" or None.
    """
    if temb is not None:
        x = x + temb.reshape(temb.shape[0], temb.shape[1], *([1] * (x.dim() - 2)))
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if act is not None else y


# ===================================================================== discriminator heads (heads.py)

def _final_logits(z: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """[N, 1, S', S'] final-conv output -> [N] (global, k > 1: S' == 1) or [N, S', S'] (local, k == 1)."""
    return z[:, 0] if kernel_size == 1 else z.reshape(z.shape[0])


def head_stack_loop_reference(feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight,
                              final_bias, ids, num_groups=32, eps=1e-5):
    """The definition of `ops.head_stack`: a plain Python loop over the sampled heads.

    Head `ids[i]` is [Conv4x4 s2 p1 -> GroupNorm(num_groups) -> SiLU] * len(conv_weights), then a k x k conv
    (k = 4: valid conv on the 4x4 map -> one logit per sample; k = 1: a logit per location) with the pooled
    parameters' row ids[i]. Returns [h, B] (global) or [h, B, S', S'] (local). Differentiable like any torch code.
    """
    outs = []
    for i in ids.tolist():
        x = feature
        for w, b, g, beta in zip(conv_weights, conv_biases, norm_weights, norm_biases):
            x = F.conv2d(x, w[i], b[i], stride=2, padding=1)
            x = F.group_norm(x, num_groups, g[i], beta[i], eps)
            x = F.silu(x)
        z = F.conv2d(x, final_weight[i], final_bias[i])
        outs.append(_final_logits(z, final_weight.shape[-1]))
    if not outs:
        return feature.new_zeros((0, feature.shape[0]))
    return torch.stack(outs)


def head_levels_loop_reference(features, conv_weights, conv_biases, norm_weights, norm_biases, final_weights,
                               final_biases, ids, counts, row_offsets=None, num_groups=32, eps=1e-5):
    """The definition of `ops.head_levels`: `head_stack_loop_reference` level by level, concatenated.

    Level l's heads are rows ids[o_l : o_l + counts[l]] - row_offsets[l] of its parameters (o_l =
    sum(counts[:l])); levels without sampled heads contribute nothing.
    """
    outs, start = [], 0
    for l, count in enumerate(counts):
        rows = ids[start:start + count] - (row_offsets[l] if row_offsets is not None else 0)
        start += count
        if count:
            outs.append(head_stack_loop_reference(features[l], conv_weights[l], conv_biases[l], norm_weights[l],
                                                  norm_biases[l], final_weights[l], final_biases[l], rows,
                                                  num_groups, eps))
    return torch.cat(outs) if outs else features[0].new_zeros((0, features[0].shape[0]))


def head_stack_batched_eager(feature, conv_weights, conv_biases, norm_weights, norm_biases, final_weight,
                             final_bias, ids, num_groups=32, eps=1e-5, *, return_intermediates=False):
    """The same computation as `head_stack_loop_reference`, batched the way a careful eager user would.

    First layers of all sampled heads as ONE conv over the shared feature with the gathered weights
    concatenated ([h*O, C, 4, 4]); deeper layers as grouped convs (groups = h); GroupNorm over h*num_groups
    groups; the final conv grouped too. Differentiable (dense gradients; the "batched eager" baseline).
    With `return_intermediates=True` also returns the list of pre-norm conv outputs ([B, h*O_d, S_d, S_d]).
    """
    h = ids.numel()
    batch = feature.shape[0]
    x = feature
    pre_norm = []
    for d, (w, b, g, beta) in enumerate(zip(conv_weights, conv_biases, norm_weights, norm_biases)):
        wg = w.index_select(0, ids)                                   # [h, O, I, 4, 4]
        x = F.conv2d(x, wg.reshape(-1, *wg.shape[2:]), b.index_select(0, ids).reshape(-1),
                     stride=2, padding=1, groups=1 if d == 0 else h)  # [B, h*O, S/2, S/2]
        pre_norm.append(x)
        x = F.group_norm(x, h * num_groups, g.index_select(0, ids).reshape(-1),
                         beta.index_select(0, ids).reshape(-1), eps)
        x = F.silu(x)
    wf = final_weight.index_select(0, ids)                            # [h, 1, I, k, k]
    z = F.conv2d(x, wf.reshape(-1, *wf.shape[2:]), final_bias.index_select(0, ids).reshape(-1), groups=h)
    z = z.transpose(0, 1)                                             # [h, B, S', S']
    out = z.reshape(h, batch) if final_weight.shape[-1] != 1 else z
    return (out, pre_norm) if return_intermediates else out


# ===================================================================== attention / GEGLU (attention.py, geglu.py)
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale + mask) @ v over the last two dims; a bool mask keeps the True positions."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers GEGLU: proj = x @ W^T + b; hidden, gate = proj.chunk(2, -1); hidden * gelu(gate) (exact erf)."""
    proj = F.linear(x, weight, bias)
    hidden, gate = proj.chunk(2, dim=-1)
    return hidden * F.gelu(gate)
