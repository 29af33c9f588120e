"""NitroAttnProcessor: a diffusers attention processor that runs nitrokernels.ops.attention.

    unet.set_attn_processor(NitroAttnProcessor())        # or attn.set_processor(...) per module

It keeps the semantics of diffusers' AttnProcessor2_0 (0.42) step for step: spatial_norm(temb), 4-D input
reshape, attention_mask preparation (prepare_attention_mask + view to [B, heads, Lq|1, Lk]), group_norm,
norm_cross on encoder states, norm_q / norm_k, attention without dropout, to_out[0] then to_out[1]
(dropout), the 4-D reshape back, residual_connection and rescale_output_factor. The softmax scale is
`attn.scale`, which is exactly AttnProcessor2_0's SDPA default 1/sqrt(head_dim) whenever diffusers picks
AttnProcessor2_0 (scale_qk=True), and AttnProcessor's 1.0 when scale_qk=False.

Differences, all invisible in the result:
  * attention runs through `nitrokernels.ops.attention` (Triton flash attention when the inputs allow it;
    with a mask, dropout or an unsupported head dim / dtype it falls back to SDPA -- or xformers, when
    installed and suitable -- and records why: `nitrokernels.ops.attention_fallbacks()`);
  * self-attention with plain nn.Linear to_q / to_k / to_v of equal shapes, dtypes and bias presence computes
    Q, K and V with ONE GEMM over the concatenated weights ("fused QKV"):
      - when autograd needs the weights' gradients (training), or under torch.compile, the weights are
        concatenated inside the graph on every call (gradients flow back to to_q / to_k / to_v unchanged);
      - otherwise (inference, frozen weights) with cache_fused_qkv=True the concatenation is cached per
        Attention module and keyed on every weight's and bias's identity (a weak reference: load_state_dict(
        assign=True) and `.data = new` give new tensors), (data_ptr, _version, dtype, device): an optimiser
        step, load_state_dict, .to() or any in-place write through the parameter bumps _version or moves the
        storage and the next call rebuilds the cache. Writes through `.data` (peft's merge / fuse_lora and
        unmerge do this) bypass version counting and cannot be seen cheaply -- no check short of reading every
        weight (which costs as much as the concatenation the cache saves) detects them. So the cache is for
        callers who own the weights: call `clear_cache()` after writes through `.data`. `patch_unet` /
        `patch_vae` install the processor with cache_fused_qkv=False (the weights are concatenated on every
        call: always the current weights, whatever the user does to the model). A CUDA graph captured while
        the cache was valid replays the cached copy: re-capture the graph after changing the weights. The
        cache costs one extra copy of the QKV weights (about 0.5 GB for an SDXL UNet in bf16).
  * to_q / to_k / to_v wrapped (a LoRA layer), hooked (offloading, layerwise casting), offloaded to meta, or
    stored in a dtype other than the input's: Q, K and V are computed by calling the modules (what
    AttnProcessor2_0 does), checked on every call; the reason is recorded (nitrokernels.nn._calltime).

diffusers' `set_default_attn_processor()` decides by `processor.__class__ in CROSS_ATTENTION_PROCESSORS`; as a
drop-in for AttnProcessor2_0, NitroAttnProcessor's class compares equal to AttnProcessor2_0 in such class
membership tests (class equality only: `type(p) is NitroAttnProcessor`, isinstance and hashing are unchanged).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from nitrokernels.nn import _calltime
from nitrokernels.ops.attention import attention

_DEPRECATION = ("The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will "
                "raise an error in the future. `scale` should directly be passed while calling the underlying "
                "pipeline component i.e., via `cross_attention_kwargs`.")


def _plain_linear(m) -> bool:
    return (type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
            and "forward" not in m.__dict__)


def _plain_tensor(p) -> bool:
    return p is not None and type(p) in (nn.Parameter, torch.Tensor) and p.device.type != "meta"


def fused_qkv_supported(attn) -> bool:
    """True when to_q / to_k / to_v can be computed by one GEMM over concatenated weights."""
    q, k, v = getattr(attn, "to_q", None), getattr(attn, "to_k", None), getattr(attn, "to_v", None)
    if not (_plain_linear(q) and _plain_linear(k) and _plain_linear(v)):
        return False
    if not (q.weight.shape == k.weight.shape == v.weight.shape):
        return False
    if not all(_plain_tensor(p) for p in (q.weight, k.weight, v.weight)):
        return False
    if not (q.weight.dtype == k.weight.dtype == v.weight.dtype and q.weight.device == k.weight.device == v.weight.device):
        return False
    biases = (q.bias, k.bias, v.bias)
    if any(b is None for b in biases):
        return all(b is None for b in biases)
    return all(_plain_tensor(b) and b.dtype == q.weight.dtype for b in biases)


def _stands_in_for():
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0
    except ImportError:  # pragma: no cover - diffusers is what calls processors
        return None
    return AttnProcessor2_0


def _fused_qkv_now(attn, hidden_states) -> bool:
    """Call-time check of the fused-QKV path: the projections are still plain, hook-free nn.Linear with weights
    in the input's dtype / device; otherwise the reason is recorded and Q, K, V go through the modules."""
    if fused_qkv_supported(attn):
        reason = _calltime.tensors_bypass_reason((attn.to_q.weight, attn.to_q.bias), hidden_states, "to_q")
        if reason is None:
            return True
    else:
        reason = None
        for name in ("to_q", "to_k", "to_v"):
            reason = _calltime.linear_bypass_reason(getattr(attn, name), None, name)
            if reason is not None:
                break
        if reason is None:
            return False  # structurally not fusable (shapes / dtypes differ): nothing was bypassed
    _calltime.record(attn, "attention", f"fused QKV not used, Q/K/V computed through the modules: {reason}")
    return False


class _StandsInForAttnProcessor2_0(type):
    """Metaclass: the class compares equal to diffusers' AttnProcessor2_0 (see the module docstring)."""

    def __eq__(cls, other):
        if type.__eq__(cls, other) is True:
            return True
        return other is not None and other is _stands_in_for() and cls.__dict__.get("_STANDS_IN", False)

    def __ne__(cls, other):
        return not cls.__eq__(other)

    __hash__ = type.__hash__


class NitroAttnProcessor(metaclass=_StandsInForAttnProcessor2_0):
    """Drop-in for AttnProcessor2_0 (and AttnProcessor) on diffusers' `Attention`."""

    _STANDS_IN = True

    def __init__(self, fuse_qkv: bool = True, cache_fused_qkv: bool = True):
        self.fuse_qkv = fuse_qkv
        self.cache_fused_qkv = cache_fused_qkv
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # ---------------------------------------------------------------------------------------------- support
    @staticmethod
    def unsupported_reason(attn) -> str | None:
        """Why this processor cannot stand in for the module's AttnProcessor2_0 / AttnProcessor, or None."""
        if getattr(attn, "to_q", None) is None:
            return "no to_q projection"
        if getattr(attn, "to_k", None) is None or getattr(attn, "to_v", None) is None:
            return "only_cross_attention without to_k / to_v (AttnAddedKVProcessor semantics)"
        if getattr(attn, "added_kv_proj_dim", None) is not None:
            return "added KV projections (add_k_proj / add_v_proj) are not handled"
        if getattr(attn, "to_out", None) is None:
            return "pre_only attention (no to_out)"
        return None

    @staticmethod
    def _fallback(attn):
        """The diffusers processor that computes what `attn` means when this one cannot (added K/V
        projections, only_cross_attention: AttnAddedKVProcessor2_0), or None (refused)."""
        if getattr(attn, "added_kv_proj_dim", None) is not None or getattr(attn, "only_cross_attention", False):
            try:
                from diffusers.models.attention_processor import AttnAddedKVProcessor2_0
            except ImportError:  # pragma: no cover - diffusers is what calls processors
                return None
            if getattr(attn, "to_q", None) is not None and getattr(attn, "to_out", None) is not None:
                return AttnAddedKVProcessor2_0()
        return None

    def __getstate__(self):  # deepcopy / pickle: the cache is per-process derived data, never copied
        state = dict(self.__dict__)
        state.pop("_cache", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"NitroAttnProcessor(fuse_qkv={self.fuse_qkv}, cache_fused_qkv={self.cache_fused_qkv})"

    def clear_cache(self) -> None:
        """Drop every cached fused QKV weight (needed only after writes through `.data`)."""
        self._cache = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------------------------------- fused QKV
    def _fused_weights(self, attn):
        params = [attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]
        has_bias = attn.to_q.bias is not None
        if has_bias:
            params += [attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if needs_grad or not self.cache_fused_qkv or torch.compiler.is_compiling():
            return self._concat(params, has_bias)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        entry = self._cache.get(attn)
        if entry is not None and entry[0] == key and all(ref() is p for ref, p in zip(entry[3], params)) \
                and not (entry[1].is_inference() and not torch.is_inference_mode_enabled()):
            return entry[1], entry[2]
        with torch.no_grad():
            weight, bias = self._concat(params, has_bias)
        if not (weight.is_cuda and torch.cuda.is_current_stream_capturing()):
            # never keep memory that belongs to a graph's pool; weak references: the very same tensors (a new
            # tensor may reuse a freed one's address), without keeping replaced weights alive
            self._cache[attn] = (key, weight, bias, tuple(weakref.ref(p) for p in params))
        return weight, bias

    @staticmethod
    def _concat(params, has_bias):
        weight = torch.cat(params[:3], dim=0)
        bias = torch.cat(params[3:], dim=0) if has_bias else None
        return weight, bias

    # ------------------------------------------------------------------------------------------------ call
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs
                 ) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            try:
                from diffusers.utils import deprecate

                deprecate("scale", "1.0.0", _DEPRECATION)
            except ImportError:  # pragma: no cover - diffusers is what calls processors
                pass

        reason = self.unsupported_reason(attn)
        if reason is not None:
            # set directly on a module it cannot stand in for: run that module's original computation
            fallback = self._fallback(attn)
            if fallback is None:
                _refuse(attn, reason)
            return fallback(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (batch, heads, source_length | 1, target_length), as AttnProcessor2_0 passes it to SDPA
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None and self.fuse_qkv and _fused_qkv_now(attn, hidden_states):
            weight, bias = self._fused_weights(attn)
            query, key, value = F.linear(hidden_states, weight, bias).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                  scale=attn.scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def _refuse(attn, reason: str):
    raise NotImplementedError(f"NitroAttnProcessor cannot compute this {type(attn).__name__}: {reason}; keep "
                              f"diffusers' processor on it (patch_unet leaves such modules alone)")
