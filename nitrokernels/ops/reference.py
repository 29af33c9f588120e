"""Plain eager references for every fused op: the definition of what each kernel must compute.

Written as plainly as possible (no fusion, no tricks); tests run them in float64. One section per kernel
family; each op module's eager backend calls these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ===================================================================== group norm family (group_norm.py)

# ===================================================================== discriminator heads (heads.py)

# ===================================================================== attention / GEGLU / LayerNorm (attention.py, geglu.py)
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


def layer_norm_reference(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing `normalized_shape` dims (biased var)."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y
