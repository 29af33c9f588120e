"""A fused forward for diffusers' ResnetBlock2D, installed on a block instance and removable again.

    reason = resnet_block_unsupported_reason(block)     # None, or why the fused forward would be wrong
    undo = fuse_resnet_block(block)                     # ValueError(reason) when unsupported
    ...; undo()                                         # the class's own forward is back, outputs bit-identical

diffusers' ResnetBlock2D.forward (pre_norm, "default" time embedding) is

    h = act(norm1(x)); [x, h = up/downsample(x), up/downsample(h)]; h = conv1(h)
    t = time_emb_proj(act(temb))                        (act skipped when skip_time_act)
    h = act(norm2(h + t[:, :, None, None])); h = conv2(dropout(h))
    out = (conv_shortcut(x) or x + h) / output_scale_factor

The fused forward runs the same modules in the same order, with these fusions:
  * norm1 + act                    -> one group_norm_silu pass (reads x once for statistics, once to write h)
  * h + temb, norm2, act           -> one group_norm_silu pass with temb added inside (the broadcast add and its
                                      [N, C, H, W] temporary disappear; temb only shifts per-channel statistics)
  * residual add / output scale    -> one add when output_scale_factor == 1 (diffusers also divides by 1.0, a
                                      second full pass); otherwise the add and an in-place divide
conv1 / conv2 / conv_shortcut / time_emb_proj / dropout / up- and downsampling are called as the block's own
modules (their hooks fire, cuDNN runs the convolutions). Parameters are the block's own: nothing is copied and
the state dict is unchanged.

Supported: SiLU ("swish" / "silu") activation, norm1 / norm2 exactly torch.nn.GroupNorm, time_embedding_norm
"default" (or no time embedding), any up / down sampling kind (fir, sde_vp, Upsample2D / Downsample2D: they
are applied to the fused norm1 output exactly as diffusers does), skip_time_act, dropout, conv_shortcut,
output_scale_factor. Not supported (the reason says which): other activations, time_embedding_norm
"scale_shift" (a per-sample scale of the normalised value), norm layers that are not nn.GroupNorm, subclasses
that override forward, a forward already replaced on the instance, hooks on the modules the fused path does not
call (norm1, norm2, nonlinearity). Calls that pass the deprecated `scale` argument run the original forward.

The same conditions are checked again at every call (cheaply: norm1 / norm2 / nonlinearity and their parameters
only): hooks added after fusing (accelerate's cpu_offload, diffusers' group offloading and layerwise casting replace
`forward` on the instance), a norm or the activation replaced or wrapped, norm parameters on the meta device, on
another device or in a dtype the kernels do not take -- then that call runs the original forward, and the reason
is recorded (nitrokernels.nn._calltime; PatchHandle.fallbacks). The installed forward is a `_FusedForward` object
(picklable and deep-copyable: torch.save(model) / copy.deepcopy of a fused model work).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from nitrokernels.nn import _calltime
from nitrokernels.nn.group_norm import norm_bypass_reason
from nitrokernels.ops.group_norm import group_norm_silu

__all__ = ["fuse_resnet_block", "resnet_block_unsupported_reason"]


def _resnet_block_class():
    try:
        from diffusers.models.resnet import ResnetBlock2D
    except ImportError:
        return None
    return ResnetBlock2D


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None)
                or getattr(module, "_backward_pre_hooks", None))


def _fused_forward(self, input_tensor, temb, *args, **kwargs):
    """ResnetBlock2D.forward with norm1+SiLU, temb add+norm2+SiLU and the residual / scale fused (see module doc)."""
    if args or kwargs.get("scale", None) is not None or (
            self.time_emb_proj is None and temb is not None and self.time_embedding_norm == "default"):
        # deprecated `scale` (the original warns), or a raw temb added without projection: the original's job
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    reason = _bypassed_now(self, input_tensor)
    if reason is not None:
        # changed since fusing (hooks added, a norm / the activation replaced or wrapped, offloaded or
        # re-typed norm parameters, e.g. by accelerate / diffusers hooks): the fused path would skip or misread
        # what was added -- run the original computation for this call
        _calltime.record(self, "resnet", reason)
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    norm1, norm2 = self.norm1, self.norm2
    hidden_states = group_norm_silu(input_tensor, norm1.num_groups, norm1.weight, norm1.bias, norm1.eps)

    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails with large batches
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)

    hidden_states = self.conv1(hidden_states)

    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)  # [N, C]: group_norm_silu broadcasts it over space itself
    add = temb if self.time_embedding_norm == "default" and temb is not None else None
    reason = norm_bypass_reason(norm2, hidden_states, "norm2")
    if reason is None and add is not None and (add.dtype not in (hidden_states.dtype, torch.float32)
                                               or add.device != hidden_states.device):
        reason = f"the time embedding is {add.dtype} on {add.device}, the features {hidden_states.dtype}"
    if reason is None:
        hidden_states = group_norm_silu(hidden_states, norm2.num_groups, norm2.weight, norm2.bias, norm2.eps,
                                        temb=add)
    else:  # conv1 / time_emb_proj returned something the kernel does not take: diffusers' own second half
        _calltime.record(self, "resnet", reason)
        if add is not None:
            hidden_states = hidden_states + add[:, :, None, None]
        hidden_states = self.nonlinearity(norm2(hidden_states))

    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)

    if self.conv_shortcut is not None:
        if self.training:  # as diffusers (DDP gradient-stride warning)
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)

    if self.output_scale_factor == 1:
        return input_tensor + hidden_states
    return (input_tensor + hidden_states).div_(self.output_scale_factor)


class _FusedForward:
    """The fused forward installed as `block.forward`: a picklable / deep-copyable callable (a bound method of a
    module-level function does not unpickle), holding its block."""

    __slots__ = ("block",)

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, *args, **kwargs):
        return _fused_forward(self.block, *args, **kwargs)

    def __reduce__(self):
        return (_FusedForward, (self.block,))

    # a bound method's interface (__func__ / __self__), for code that introspects `block.forward`
    @property
    def __func__(self):
        return _fused_forward

    @property
    def __self__(self):
        return self.block

    def __repr__(self) -> str:
        return f"<nitrokernels fused forward of {type(self.block).__name__}>"


def _is_fused(block: nn.Module) -> bool:
    return isinstance(block.__dict__.get("forward"), _FusedForward)


def _hooked(module: nn.Module) -> bool:
    return _has_hooks(module) or "forward" in module.__dict__


def _bypassed_now(block: nn.Module, x: torch.Tensor | None = None) -> str | None:
    """The call-time part of resnet_block_unsupported_reason: what the fused forward would bypass now.

    Cheap by design (a few attribute reads on norm1 / norm2 / nonlinearity and their parameters, no tree walk):
    hooks (including accelerate's and diffusers' hook registries, which replace `forward` on the instance),
    a norm or the activation replaced (type no longer exactly nn.GroupNorm / nn.SiLU: a wrapper, a LoRA layer),
    parameters on the meta device (offloaded), on another device or in a dtype the kernels do not take."""
    nonlinearity = block.nonlinearity
    if type(nonlinearity) is not nn.SiLU:
        return f"nonlinearity is {type(nonlinearity).__name__}, not nn.SiLU"
    if _hooked(nonlinearity):
        return "hooks on nonlinearity"
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if type(norm) is not nn.GroupNorm:
            return f"{name} is {type(norm).__module__}.{type(norm).__qualname__}, not nn.GroupNorm"
        if _has_hooks(norm):
            return f"hooks on {name}"
        if "forward" in norm.__dict__:
            return f"{name}.forward was replaced on the instance (accelerate / diffusers hooks: offloading, casting)"
    if block.time_embedding_norm == "scale_shift":
        return "time_embedding_norm='scale_shift'"
    if x is not None:
        return norm_bypass_reason(block.norm1, x, "norm1")
    return None


def resnet_block_unsupported_reason(block: nn.Module) -> str | None:
    """None when `fuse_resnet_block(block)` gives the same results as block's own forward, else the reason."""
    cls = _resnet_block_class()
    if cls is None:
        return "diffusers is not installed"
    if not isinstance(block, cls):
        return f"{type(block).__name__} is not a diffusers ResnetBlock2D"
    if type(block).forward is not cls.forward:
        return f"{type(block).__name__} overrides ResnetBlock2D.forward"
    if _is_fused(block):
        return "already fused (call the undo function first)"
    if "forward" in block.__dict__:
        return "the block's forward was already replaced on the instance by someone else"
    if type(block.nonlinearity) is not nn.SiLU:
        return f"activation is {type(block.nonlinearity).__name__}, not SiLU (the fused kernels apply SiLU only)"
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if type(norm) is not nn.GroupNorm:
            return f"{name} is {type(norm).__name__}, not torch.nn.GroupNorm"
    if block.time_embedding_norm == "scale_shift":
        return "time_embedding_norm='scale_shift' (per-sample scale of the normalised value) is not fused"
    for name in ("norm1", "norm2", "nonlinearity"):
        if _hooked(getattr(block, name)):
            return f"hooks on {name} would be bypassed by the fused forward"
    return None


def fuse_resnet_block(block: nn.Module) -> Callable[[], None]:
    """Install the fused forward on this block instance; returns a function that restores the original.

    Raises ValueError(reason) when `resnet_block_unsupported_reason(block)` objects. The undo function removes
    the instance attribute, so the class's forward runs again (bit-identical outputs); calling it twice, or
    after someone else replaced the forward, changes nothing.
    """
    reason = resnet_block_unsupported_reason(block)
    if reason is not None:
        raise ValueError(f"fuse_resnet_block: {reason}")
    fused = _FusedForward(block)
    block.forward = fused

    def undo() -> None:
        if block.__dict__.get("forward") is fused:
            del block.__dict__["forward"]

    return undo
