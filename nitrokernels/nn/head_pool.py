"""HeadPool: a pool of light discriminator heads over backbone feature levels (NitroFusion's dynamic heads).

    pool = HeadPool()                                   # 10 SDXL levels x 4 heads, hidden 256, global heads
    opt = nitrokernels.optim.SampledAdamW(pool.parameters(), lr=1e-4)
    ids = pool.sample(2)                                # 2 heads per level, level-major, no host sync
    logits = pool(features, ids)                        # [20, B]; ONE grouped op call for all levels
    loss = F.softplus(-logits).mean(); loss.backward()  # sparse gradients: only the sampled heads' rows
    opt.step(); opt.zero_grad()
    pool.refresh_(0.01, optimizer=opt)                  # re-initialise ~1% of the heads and their moments

Heads. Head `i` lives on level `i // heads_per_level` (row `i % heads_per_level` of that level's pooled
tensors) and reads that level's feature map [B, C, S, S]:
  * global: [Conv 4x4 stride 2 pad 1 -> GroupNorm(num_groups) -> SiLU] until the map is 4x4, then a valid
    Conv 4x4 -> one logit per sample; output [h, B];
  * local:  the same stack until the map is local_size x local_size, then a 1x1 conv -> per-location logits
    (patch scores); output [h, B, local_size, local_size].
Every level needs at least one downsampling layer: S must be 4 * 2^k (global) or local_size * 2^k
(local) with k >= 1.

Storage. One tensor per layer depth per level, indexed by head along dim 0 (pools.<level>.conv_weight.<d>
[P, 4, 4, C_in, hidden] -- the GEMM layout (kh, kw, input channel, output channel; output channels
contiguous), so the kernels load any head's weight tiles with 16-byte copies and write its gradient with
vector stores, no per-call copy; `conv_weights_oihw(level)` gives torch's [P, hidden, C_in, 4, 4] views of
them --, conv_bias / norm_weight / norm_bias.<d> [P, hidden], final_weight [P, 1, hidden, k, k], final_bias
[P, 1]); each head is initialised like torch's Conv2d (uniform in +-1/sqrt(fan_in) for weight and bias) and
GroupNorm (weight 1, bias 0), on the parameters' device. `as_module` / `load_from_modules` convert to and
from torch's layers, and a state dict saved with the earlier [P, hidden, C_in, 4, 4] conv weights loads
(converted on load). The math runs in
`nitrokernels.ops.head_levels`, all levels in one call (on the Triton backend one launch per kernel type
per layer depth, whatever the number of levels), which gives these tensors SPARSE COO gradients (rows =
sampled heads): use `nitrokernels.optim.SampledAdamW` (torch.optim.AdamW rejects sparse gradients).

Dtypes. The op runs in the features' dtype. When the parameters have another dtype (fp32 master weights with
bf16 features, say), the sampled heads' rows -- never the pool -- are gathered and cast for the call, and
their gradients come back, still sparse, in the parameters' dtype. Same dtypes avoid that copy.

Head ids and host syncs. `forward(features, head_ids)` accepts any LongTensor of head ids (any subset and
order, repeats allowed, several levels mixed) and returns logits in the caller's order. Grouping arbitrary
ids by level needs their values on the host: one device->host copy (a sync) per call. `sample()` instead
returns a `HeadSample` -- a LongTensor whose ids are laid out level-major with a fixed count per level,
which it records -- and `forward` then passes it as it is, with those counts, to the one op call (no
host sync), so the step can be captured in a CUDA graph for a fixed count. On a GPU the range of a HeadSample's ids is then trusted (it
is in range by construction; head_levels' device-side assert is the backstop); on the CPU it is checked.
`pool.as_sample(ids, count_per_level)` validates a level-major id tensor of your own once and returns it
as a HeadSample. Any operation on a HeadSample (indexing, cat, clone, .to another device) returns a plain
tensor, which takes the general path again.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

__all__ = ["SDXL_LEVELS", "HeadPool", "HeadSample"]

SDXL_LEVELS = ((320, 128), (320, 128), (320, 128), (320, 64), (640, 64), (640, 64), (640, 32), (1280, 32),
               (1280, 32), (1280, 32))
KINDS = ("global", "local")
_KERNEL, _STRIDE, _PADDING = 4, 2, 1


def _head_levels(*args, **kwargs):
    from nitrokernels.ops.heads import head_levels  # imported on first use (the op module pulls in Triton)

    return head_levels(*args, **kwargs)


class _GatherRows(torch.autograd.Function):
    """Rows `ids` of a pooled tensor, cast to `dtype`; the gradient returns as sparse COO rows of the pool.

    Used only when the features' dtype differs from the parameters' (e.g. fp32 master weights, bf16
    features): it copies the sampled heads' rows, never the pool, and keeps the gradient sparse.
    """

    @staticmethod
    def forward(ctx, weight, ids, dtype):
        ctx.save_for_backward(ids)
        ctx.shape, ctx.weight_dtype = weight.shape, weight.dtype
        return weight.index_select(0, ids).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        if grad.is_sparse:  # head_levels' gradient: rows of the gathered tensor
            rows, values = ids.index_select(0, grad._indices()[0]), grad._values()
        else:
            rows, values = ids, grad
        sparse = torch.sparse_coo_tensor(rows.unsqueeze(0), values.to(ctx.weight_dtype), ctx.shape,
                                         check_invariants=False)
        return sparse, None, None


class HeadSample(torch.Tensor):
    """A LongTensor of head ids laid out level-major with a fixed count per level.

    `counts[l]` ids of level l follow those of level l-1; `heads_per_level` names the pool layout it was
    made for. `HeadPool.forward` uses the counts to slice the ids per level on the device (no host sync).
    Made by `HeadPool.sample` / `HeadPool.as_sample`; treat it as immutable. Operations on it return plain
    tensors (the layout is not assumed to survive them).
    """

    counts: tuple[int, ...]
    heads_per_level: int

    @staticmethod
    def __new__(cls, ids: torch.Tensor, counts: Sequence[int], heads_per_level: int):
        obj = torch.Tensor._make_subclass(cls, ids.detach(), False)
        obj.counts = tuple(int(c) for c in counts)
        obj.heads_per_level = int(heads_per_level)
        return obj

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __reduce_ex__(self, protocol):  # pickle as a plain tensor plus the layout
        return HeadSample, (self.as_subclass(torch.Tensor).clone(), self.counts, self.heads_per_level)

    def __deepcopy__(self, memo):
        return HeadSample(self.as_subclass(torch.Tensor).clone(), self.counts, self.heads_per_level)

    def __repr__(self, *, tensor_contents=None):
        return f"HeadSample(counts={self.counts}, ids={self.as_subclass(torch.Tensor).tolist()})"


class _LevelHeads(nn.Module):
    """The pooled parameters of one level: one tensor per layer depth, indexed by head along dim 0; conv
    weights in the GEMM layout [P, 4, 4, C_in, hidden] (state-dict version 2; version 1 stored
    [P, hidden, C_in, 4, 4] and is converted when loaded)."""

    _version = 2

    def __init__(self, pool_size, in_channels, hidden, depth, final_kernel, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.conv_weight = nn.ParameterList()
        self.conv_bias = nn.ParameterList()
        self.norm_weight = nn.ParameterList()
        self.norm_bias = nn.ParameterList()
        for d in range(depth):
            cin = in_channels if d == 0 else hidden
            self.conv_weight.append(nn.Parameter(torch.empty(pool_size, _KERNEL, _KERNEL, cin, hidden, **kw)))
            self.conv_bias.append(nn.Parameter(torch.empty(pool_size, hidden, **kw)))
            self.norm_weight.append(nn.Parameter(torch.empty(pool_size, hidden, **kw)))
            self.norm_bias.append(nn.Parameter(torch.empty(pool_size, hidden, **kw)))
        self.final_weight = nn.Parameter(torch.empty(pool_size, 1, hidden, final_kernel, final_kernel, **kw))
        self.final_bias = nn.Parameter(torch.empty(pool_size, 1, **kw))

    def convs(self):
        """(weight as a torch-layout [P, O, I, k, k] view, bias, fan_in) of every conv, in order: the stack,
        then the final conv."""
        out = [(w, b, w.shape[2] * w.shape[3] * w.shape[4]) for w, b in zip(self.conv_weights_oihw(), self.conv_bias)]
        w = self.final_weight
        return out + [(w, self.final_bias, w.shape[2] * w.shape[3] * w.shape[4])]

    def conv_weights_oihw(self) -> list[torch.Tensor]:
        """The conv weights as torch's [P, O, I, 4, 4] (zero-copy permuted views of the parameters; what
        `nitrokernels.ops.head_levels` takes, and how the kernels read them at no cost)."""
        return [w.permute(0, 4, 3, 1, 2) for w in self.conv_weight]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Version-1 state dicts hold conv weights as [P, O, I, 4, 4]: convert them to [P, 4, 4, I, O]."""
        if (local_metadata.get("version") or 1) < 2:
            for d, w in enumerate(self.conv_weight):
                key = f"{prefix}conv_weight.{d}"
                old = state_dict.get(key)
                if isinstance(old, torch.Tensor) and old.dim() == 5 and \
                        tuple(old.shape[1:]) == (w.shape[4], w.shape[3], w.shape[1], w.shape[2]):
                    state_dict[key] = old.permute(0, 3, 4, 2, 1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _generator_on(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """`generator` when it lives on `device` (or None: the device's default generator), else a generator on
    `device` seeded by one draw from `generator` (deterministic in its state)."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2 ** 62, (), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def _power_of_two_steps(size: int, target: int) -> int | None:
    """k >= 1 with size == target * 2**k, else None."""
    if target < 1 or size <= target or size % target:
        return None
    ratio = size // target
    return ratio.bit_length() - 1 if ratio & (ratio - 1) == 0 else None


class HeadPool(nn.Module):
    """A pool of discriminator heads over feature levels; see the module docstring for layout and usage.

    Args:
        levels: [(channels, size), ...] of the backbone feature maps (default: the 10 SDXL levels at 1024²).
        heads_per_level: pool size P of every level; num_heads = len(levels) * P.
        hidden: channels of every head's conv layers (divisible by num_groups).
        num_groups: GroupNorm groups. kind: "global" (one logit per sample) or "local" (logit map).
        local_size: output map size of local heads. eps: GroupNorm epsilon. device, dtype: of the parameters.
    """

    def __init__(self, levels: Sequence[tuple[int, int]] = SDXL_LEVELS, heads_per_level: int = 4,
                 hidden: int = 256, num_groups: int = 32, kind: str = "global", local_size: int = 8,
                 eps: float = 1e-5, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"HeadPool: kind must be one of {KINDS}, got {kind!r}")
        for name, value in (("heads_per_level", heads_per_level), ("hidden", hidden), ("num_groups", num_groups),
                            ("local_size", local_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HeadPool: {name} must be a positive int, got {value!r}")
        if hidden % num_groups:
            raise ValueError(f"HeadPool: hidden ({hidden}) must be divisible by num_groups ({num_groups})")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not eps > 0:
            raise ValueError(f"HeadPool: eps must be a finite number > 0, got {eps!r}")
        try:
            pairs = [(c, s) for c, s in levels]
            if any(isinstance(v, bool) or int(v) != v for pair in pairs for v in pair):
                raise ValueError
            levels = tuple((int(c), int(s)) for c, s in pairs)
        except (TypeError, ValueError):
            raise ValueError(f"HeadPool: levels must be a sequence of (channels, size) int pairs, got {levels!r}") from None
        if not levels:
            raise ValueError("HeadPool: levels is empty")
        target = 4 if kind == "global" else local_size
        depths = []
        for index, (channels, size) in enumerate(levels):
            if channels < 1:
                raise ValueError(f"HeadPool: level {index} has {channels} channels")
            depth = _power_of_two_steps(size, target)
            if depth is None:
                raise ValueError(
                    f"HeadPool: level {index} has size {size}, which does not halve down to {target} "
                    f"({'global heads end at 4x4' if kind == 'global' else f'local_size={local_size}'}): "
                    f"the size must be {target} * 2**k with k >= 1 (e.g. {target * 2}, {target * 4}, {target * 8})")
            depths.append(depth)
        self.levels = levels
        self.depths = tuple(depths)
        self.heads_per_level = heads_per_level
        self.hidden = hidden
        self.num_groups = num_groups
        self.kind = kind
        self.local_size = local_size
        self.eps = float(eps)
        self.final_kernel = 4 if kind == "global" else 1
        self.pools = nn.ModuleList(
            _LevelHeads(heads_per_level, channels, hidden, depth, self.final_kernel, device=device, dtype=dtype)
            for (channels, _), depth in zip(levels, depths))
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- basics
    @property
    def num_heads(self) -> int:
        """Heads in the pool: len(levels) * heads_per_level."""
        return len(self.levels) * self.heads_per_level

    @property
    def device(self) -> torch.device:
        """The device of the pool's parameters."""
        return self.pools[0].final_bias.device

    def level_of(self, head_id: int) -> int:
        """The feature level head `head_id` reads (head_id // heads_per_level); IndexError outside the pool."""
        return self._check_head_id(head_id) // self.heads_per_level

    def output_shape(self, num_ids: int, batch: int) -> tuple[int, ...]:
        """Shape of the logits of `num_ids` heads on a batch: [num_ids, batch] (global) or
        [num_ids, batch, local_size, local_size] (local)."""
        if self.kind == "global":
            return (num_ids, batch)
        return (num_ids, batch, self.local_size, self.local_size)

    def extra_repr(self) -> str:
        return (f"levels={len(self.levels)}, heads_per_level={self.heads_per_level}, num_heads={self.num_heads}, "
                f"hidden={self.hidden}, num_groups={self.num_groups}, kind={self.kind!r}"
                + (f", local_size={self.local_size}" if self.kind == "local" else "") + f", eps={self.eps}")

    def _check_head_id(self, head_id) -> int:
        if isinstance(head_id, torch.Tensor):
            if head_id.numel() != 1 or head_id.is_floating_point() or head_id.is_complex():
                raise TypeError(f"HeadPool: a head id must be one integer, got a tensor {head_id.dtype} "
                                f"{tuple(head_id.shape)}")
            head_id = head_id.item()
        if isinstance(head_id, bool) or not isinstance(head_id, int):
            raise TypeError(f"HeadPool: a head id must be an int, got {type(head_id).__name__}")
        if not 0 <= head_id < self.num_heads:
            raise IndexError(f"HeadPool: head id {head_id} is out of range [0, {self.num_heads})")
        return head_id

    # ------------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every head like torch's Conv2d / GroupNorm defaults."""
        for level in range(len(self.levels)):
            self._init_rows(level, torch.arange(self.heads_per_level), None)

    def _init_rows(self, level: int, rows: torch.Tensor, generator: torch.Generator | None) -> None:
        """Re-initialise `rows` (a LongTensor of rows of this level) of every tensor of the level.

        The values are drawn on the parameters' device (a generator on another device seeds one there: one
        draw from it), so a GPU pool never draws or copies on the host; in float64 on the CPU (bit-identical
        to earlier seeded runs) and in the parameters' dtype (float32 for 16-bit ones) elsewhere. Random
        numbers are drawn in torch's [n, O, I, k, k] order whatever the storage layout."""
        heads = self.pools[level]
        n = rows.numel()
        if n == 0:
            return
        device = heads.final_bias.device
        gen = _generator_on(generator, device)
        index = rows.to(device)

        def uniform(shape, bound, like):
            dtype = torch.float64 if device.type == "cpu" else \
                (like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32)
            values = torch.rand(shape, generator=gen, device=device, dtype=dtype)
            return values.mul_(2).sub_(1).mul_(bound).to(like.dtype)

        for weight, bias, fan_in in heads.convs():      # weight: a [P, O, I, k, k] view of the parameter
            bound = 1.0 / math.sqrt(fan_in)
            weight.index_copy_(0, index, uniform((n,) + tuple(weight.shape[1:]), bound, weight))
            bias.index_copy_(0, index, uniform((n,) + tuple(bias.shape[1:]), bound, bias))
        for weight, bias in zip(heads.norm_weight, heads.norm_bias):
            weight.index_fill_(0, index, 1.0)
            bias.index_fill_(0, index, 0.0)

    # --------------------------------------------------------------------------------------- sampling
    def _counts(self, count_per_level) -> tuple[int, ...]:
        if isinstance(count_per_level, int) and not isinstance(count_per_level, bool):
            counts = (count_per_level,) * len(self.levels)
        else:
            try:
                counts = tuple(count_per_level)
            except TypeError:
                raise TypeError(f"HeadPool: count_per_level must be an int or one int per level, "
                                f"got {count_per_level!r}") from None
            if len(counts) != len(self.levels) or not all(
                    isinstance(c, int) and not isinstance(c, bool) for c in counts):
                raise ValueError(f"HeadPool: count_per_level needs one int per level ({len(self.levels)}), "
                                 f"got {count_per_level!r}")
        if not all(0 <= c <= self.heads_per_level for c in counts):
            raise ValueError(f"HeadPool: count_per_level must be in [0, heads_per_level={self.heads_per_level}] "
                             f"(heads are drawn without repetition within a level), got {count_per_level!r}")
        return counts

    def sample(self, count_per_level, generator: torch.Generator | None = None, device=None) -> HeadSample:
        """Draw `count_per_level` distinct heads of every level (an int, or one int per level).

        Returns a HeadSample (a LongTensor [sum(counts)]), level-major, on `device` (default: the pool's).
        Random numbers come from `generator` (on its device) or the default generator of `device`; nothing
        syncs with the host.
        """
        counts = self._counts(count_per_level)
        device = torch.device(device) if device is not None else self.device
        draw_device = generator.device if generator is not None else device
        scores = torch.rand(len(self.levels), self.heads_per_level, generator=generator, device=draw_device)
        order = scores.argsort(dim=1)
        offsets = torch.arange(len(self.levels), device=draw_device)[:, None] * self.heads_per_level
        ids = order + offsets
        if len(set(counts)) == 1:
            ids = ids[:, :counts[0]].reshape(-1)
        else:
            ids = torch.cat([ids[level, :count] for level, count in enumerate(counts)])
        return HeadSample(ids.to(device), counts, self.heads_per_level)

    def as_sample(self, head_ids: torch.Tensor, count_per_level) -> HeadSample:
        """Validate once that `head_ids` is level-major with these counts and tag it as a HeadSample.

        Checking the values syncs with the host once; forward calls with the result then do not.
        """
        counts = self._counts(count_per_level)
        ids = self._check_ids_tensor(head_ids, self.device)
        if ids.numel() != sum(counts):
            raise ValueError(f"HeadPool.as_sample: {ids.numel()} ids but count_per_level sums to {sum(counts)}")
        host = ids.cpu()
        start = 0
        for level, count in enumerate(counts):
            part = host[start:start + count]
            low, high = level * self.heads_per_level, (level + 1) * self.heads_per_level
            if part.numel() and (part.min() < low or part.max() >= high):
                raise ValueError(f"HeadPool.as_sample: ids {part.tolist()} at positions {start}..{start + count - 1} "
                                 f"should be heads of level {level}, i.e. in [{low}, {high})")
            start += count
        return HeadSample(ids, counts, self.heads_per_level)

    # ---------------------------------------------------------------------------------------- forward
    def _check_features(self, features) -> tuple[int, torch.dtype, torch.device]:
        if isinstance(features, torch.Tensor) or not isinstance(features, Sequence):
            raise TypeError(f"HeadPool: features must be a list of {len(self.levels)} tensors, one per level, "
                            f"got {type(features).__name__}")
        if len(features) != len(self.levels):
            raise ValueError(f"HeadPool: got {len(features)} feature maps for {len(self.levels)} levels")
        batch = dtype = device = None
        for index, (x, (channels, size)) in enumerate(zip(features, self.levels)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"HeadPool: features[{index}] is a {type(x).__name__}, not a tensor")
            if x.dim() != 4 or x.shape[1] != channels or x.shape[2] != size or x.shape[3] != size:
                raise ValueError(f"HeadPool: features[{index}] has shape {tuple(x.shape)}; level {index} expects "
                                 f"[B, {channels}, {size}, {size}]")
            if not x.is_floating_point():
                raise TypeError(f"HeadPool: features[{index}] has dtype {x.dtype}; expected a floating dtype")
            if batch is None:
                batch, dtype, device = x.shape[0], x.dtype, x.device
            if x.shape[0] != batch:
                raise ValueError(f"HeadPool: features[{index}] has batch {x.shape[0]}, features[0] has {batch}")
            if x.dtype != dtype:
                raise TypeError(f"HeadPool: features[{index}] has dtype {x.dtype}, features[0] has {dtype}")
            if x.device != device:
                raise ValueError(f"HeadPool: features[{index}] is on {x.device}, features[0] on {device}")
        if batch == 0:
            raise ValueError("HeadPool: the feature batch is empty")
        if device != self.device:
            raise ValueError(f"HeadPool: features are on {device} but the pool's parameters are on {self.device}; "
                             f"move one of them (pool.to(device))")
        return batch, dtype, device

    @staticmethod
    def _check_ids_tensor(head_ids, device: torch.device) -> torch.Tensor:
        if not isinstance(head_ids, torch.Tensor):
            raise TypeError(f"HeadPool: head_ids must be a LongTensor, got {type(head_ids).__name__}")
        if head_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"HeadPool: head_ids must be an integer (long) tensor, got {head_ids.dtype}")
        if head_ids.dim() != 1:
            raise ValueError(f"HeadPool: head_ids must be 1-D [h], got shape {tuple(head_ids.shape)}")
        if head_ids.device != device:
            raise ValueError(f"HeadPool: head_ids are on {head_ids.device} but the features are on {device}; "
                             f"move them (ids.to(device)) or draw them with pool.sample(...)")
        return head_ids if head_ids.dtype == torch.int64 else head_ids.long()

    def _fast_counts(self, head_ids) -> tuple[int, ...] | None:
        """The per-level counts when `head_ids` is a HeadSample made for this pool's layout, else None."""
        if not isinstance(head_ids, HeadSample):
            return None
        counts = head_ids.counts
        if (head_ids.heads_per_level != self.heads_per_level or len(counts) != len(self.levels)
                or sum(counts) != head_ids.numel() or head_ids.dim() != 1):
            raise ValueError(f"HeadPool: this HeadSample (counts {counts}, heads_per_level "
                             f"{head_ids.heads_per_level}) was not made for this pool ({len(self.levels)} levels x "
                             f"{self.heads_per_level} heads)")
        return counts

    def _run_levels(self, features, ids: torch.Tensor, counts, row_offsets) -> torch.Tensor:
        """One head_levels call for every level: level l's heads are pool rows ids[o_l : o_l + counts[l]] -
        row_offsets[l] (o_l = sum(counts[:l])); logits in the order of `ids`."""
        pools = self.pools
        tensors = [[p.conv_weights_oihw() for p in pools], [list(p.conv_bias) for p in pools],
                   [list(p.norm_weight) for p in pools], [list(p.norm_bias) for p in pools],
                   [p.final_weight for p in pools], [p.final_bias for p in pools]]
        if features[0].dtype != pools[0].final_bias.dtype:  # gather + cast the sampled rows only (_GatherRows)
            starts = [sum(counts[:l]) for l in range(len(counts))]
            rows = [ids[s:s + c] - r for s, c, r in zip(starts, counts, row_offsets)]

            def cast(t, level):
                return _GatherRows.apply(t, rows[level], features[0].dtype)
            tensors[0] = [list(p.conv_weight) for p in pools]       # gathered in their [P, 4, 4, I, O] storage
            tensors = [[[cast(t, level) for t in ts] for level, ts in enumerate(per_level)] for per_level in tensors[:4]] \
                + [[cast(t, level) for level, t in enumerate(per_level)] for per_level in tensors[4:]]
            tensors[0] = [[w.permute(0, 4, 3, 1, 2) for w in ws] for ws in tensors[0]]
            ids, row_offsets = torch.arange(ids.numel(), device=ids.device), starts
        return _head_levels(list(features), *tensors, ids, counts, row_offsets, num_groups=self.num_groups,
                            eps=self.eps)

    def forward(self, features: Sequence[torch.Tensor], head_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the heads `head_ids` on `features` (one map per level): [h, B] or [h, B, s, s].

        All levels run in one `head_levels` call (one launch per kernel type per layer depth). A HeadSample
        (from `sample` / `as_sample`) runs with no host sync; any other id tensor is checked and grouped by
        level on the host (one device->host copy when it lives on a GPU).
        """
        batch, dtype, device = self._check_features(features)
        counts = self._fast_counts(head_ids)
        ids = self._check_ids_tensor(head_ids, device)
        P = self.heads_per_level
        offsets = [level * P for level in range(len(self.levels))]
        if counts is not None:
            ids = ids.as_subclass(torch.Tensor)
            if ids.device.type == "cpu":  # checking costs nothing here: do it
                self._check_ranges(ids, counts)
            inverse = None
        else:
            host = ids.cpu()
            if host.numel() and (host.min() < 0 or host.max() >= self.num_heads):
                bad = host[(host < 0) | (host >= self.num_heads)].unique().tolist()
                raise IndexError(f"HeadPool: head ids {bad} are out of range [0, {self.num_heads})")
            level_of = torch.div(host, P, rounding_mode="floor")
            order = torch.argsort(level_of, stable=True)
            counts = torch.bincount(level_of, minlength=len(self.levels)).tolist()
            identity = torch.equal(order, torch.arange(order.numel()))
            ids = ids if identity else host[order].to(device, non_blocking=True)
            inverse = None if identity else torch.empty_like(order).scatter_(
                0, order, torch.arange(order.numel())).to(device, non_blocking=True)
        if not sum(counts):
            return torch.zeros(self.output_shape(0, batch), dtype=dtype, device=device)
        out = self._run_levels(features, ids, list(counts), offsets)
        return out if inverse is None else out.index_select(0, inverse)

    def _check_ranges(self, ids: torch.Tensor, counts) -> None:
        start = 0
        for level, count in enumerate(counts):
            part = ids[start:start + count]
            low, high = level * self.heads_per_level, (level + 1) * self.heads_per_level
            if part.numel() and (part.min() < low or part.max() >= high):
                raise IndexError(f"HeadPool: HeadSample ids {part.tolist()} of level {level} are not in [{low}, {high})")
            start += count

    # ------------------------------------------------------------------------------- module export
    def conv_weights_oihw(self, level: int) -> list[torch.Tensor]:
        """Level `level`'s conv weights as torch's [P, O, I, 4, 4] (zero-copy views of the [P, 4, 4, I, O]
        parameters): what `nitrokernels.ops.head_levels` / `head_stack` take (the kernels read them at no cost);
        gradients flow back to the parameters."""
        return self.pools[level].conv_weights_oihw()

    @torch.no_grad()
    def as_module(self, head_id) -> nn.Sequential:
        """A plain nn.Sequential of torch layers holding head `head_id`'s current weights (a copy).

        Its output for the head's level feature x [B, C, S, S] is [B, 1, 1, 1] (global) or
        [B, 1, local_size, local_size] (local); the pool returns the same values without the channel dim.
        """
        head_id = self._check_head_id(head_id)
        level, row = divmod(head_id, self.heads_per_level)
        heads = self.pools[level]
        ref = heads.final_bias
        kw = dict(device=ref.device, dtype=ref.dtype)
        layers = []
        for d in range(self.depths[level]):
            weight = heads.conv_weight[d]
            conv = nn.Conv2d(weight.shape[3], self.hidden, _KERNEL, _STRIDE, _PADDING, **kw)
            conv.weight.copy_(weight[row].permute(3, 2, 0, 1))     # [4, 4, I, O] -> [O, I, 4, 4]
            conv.bias.copy_(heads.conv_bias[d][row])
            norm = nn.GroupNorm(self.num_groups, self.hidden, eps=self.eps, **kw)
            norm.weight.copy_(heads.norm_weight[d][row])
            norm.bias.copy_(heads.norm_bias[d][row])
            layers += [conv, norm, nn.SiLU()]
        final = nn.Conv2d(self.hidden, 1, self.final_kernel, **kw)
        final.weight.copy_(heads.final_weight[row])
        final.bias.copy_(heads.final_bias[row])
        return nn.Sequential(*layers, final)

    @torch.no_grad()
    def load_from_modules(self, modules: Mapping[int, nn.Module]) -> None:
        """Copy weights into heads: `{head_id: nn.Sequential}` laid out as `as_module` makes them.

        Every module is checked (layer types, shapes, conv stride / padding, GroupNorm groups and eps) before
        anything is written, so a bad entry leaves the pool unchanged.
        """
        if not isinstance(modules, Mapping):
            raise TypeError(f"HeadPool.load_from_modules: expected a mapping {{head_id: nn.Sequential}}, "
                            f"got {type(modules).__name__}")
        plan = []
        for head_id, module in modules.items():
            head_id = self._check_head_id(head_id)
            plan.append((head_id, self._layers_of(head_id, module)))
        for head_id, (stack, final) in plan:
            level, row = divmod(head_id, self.heads_per_level)
            heads = self.pools[level]
            for d, (conv, norm) in enumerate(stack):
                heads.conv_weight[d][row].copy_(conv.weight.permute(2, 3, 1, 0))
                heads.conv_bias[d][row].copy_(conv.bias)
                heads.norm_weight[d][row].copy_(norm.weight)
                heads.norm_bias[d][row].copy_(norm.bias)
            heads.final_weight[row].copy_(final.weight)
            heads.final_bias[row].copy_(final.bias)

    def _layers_of(self, head_id: int, module: nn.Module):
        level = head_id // self.heads_per_level
        where = f"HeadPool.load_from_modules: head {head_id} (level {level})"
        layers = list(module.children()) if isinstance(module, nn.Sequential) else None
        depth = self.depths[level]
        expected = (["Conv2d", "GroupNorm", "SiLU"] * depth) + ["Conv2d"]
        names = [type(layer).__name__ for layer in layers] if layers is not None else None
        if names != expected:
            raise ValueError(f"{where}: expected nn.Sequential({', '.join(expected)}), got "
                             f"{names if names is not None else type(module).__name__}")
        stack = []
        for d in range(depth):
            conv, norm = layers[3 * d], layers[3 * d + 1]
            cin = self.levels[level][0] if d == 0 else self.hidden
            self._check_conv(where, d, conv, cin, self.hidden, _KERNEL, _STRIDE, _PADDING)
            if norm.num_groups != self.num_groups or norm.num_channels != self.hidden or not norm.affine \
                    or norm.eps != self.eps:
                raise ValueError(f"{where}: layer {3 * d + 1} is GroupNorm({norm.num_groups}, {norm.num_channels}, "
                                 f"eps={norm.eps}, affine={norm.affine}); expected GroupNorm({self.num_groups}, "
                                 f"{self.hidden}, eps={self.eps}, affine=True)")
            stack.append((conv, norm))
        final = layers[-1]
        self._check_conv(where, depth, final, self.hidden, 1, self.final_kernel, 1, 0)
        return stack, final

    @staticmethod
    def _check_conv(where, index, conv, cin, cout, kernel, stride, padding):
        ok = (conv.in_channels == cin and conv.out_channels == cout and conv.kernel_size == (kernel, kernel)
              and conv.stride == (stride, stride) and conv.padding == (padding, padding) and conv.groups == 1
              and conv.dilation == (1, 1) and conv.bias is not None and conv.padding_mode == "zeros")
        if not ok:
            raise ValueError(f"{where}: conv {index} is {conv}; expected Conv2d({cin}, {cout}, kernel_size={kernel}, "
                             f"stride={stride}, padding={padding}) with a bias")

    # ---------------------------------------------------------------------------------------- refresh
    @torch.no_grad()
    def reset_heads_(self, head_ids, generator: torch.Generator | None = None, optimizer=None) -> None:
        """Re-initialise the heads `head_ids` (ints or an integer tensor) and reset their optimiser state.

        `optimizer`: one that has `reset_rows(param, rows)` (SampledAdamW: moments and per-row step) or any
        torch optimiser whose per-parameter state tensors have the parameter's shape (torch.optim.AdamW /
        Adam: exp_avg, exp_avg_sq, max_exp_avg_sq; SGD: momentum_buffer) -- those rows are zeroed. torch's
        AdamW keeps ONE step counter per tensor, which cannot be reset per head: the refreshed heads' next
        updates use that tensor's (larger) step in the bias correction, i.e. a smaller effective step size
        early on than a fresh AdamW. SampledAdamW's per-row step makes it exact.
        """
        ids = torch.as_tensor(head_ids, dtype=torch.long).reshape(-1).cpu()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_heads):
            raise IndexError(f"HeadPool.reset_heads_: head ids must be in [0, {self.num_heads}), got {ids.tolist()}")
        ids = ids.unique()
        if optimizer is not None:
            self._check_optimizer(optimizer)
        for level in range(len(self.levels)):
            mine = ids[(ids // self.heads_per_level) == level]
            if not mine.numel():
                continue
            rows = mine - level * self.heads_per_level
            self._init_rows(level, rows, generator)
            if optimizer is not None:
                for param in self.pools[level].parameters():
                    _reset_optimizer_rows(optimizer, param, rows)

    def refresh_(self, fraction: float = 0.01, generator: torch.Generator | None = None,
                 optimizer=None) -> torch.Tensor:
        """Re-initialise a random `fraction` of all heads and reset their state in `optimizer`.

        The count is fraction * num_heads rounded stochastically (floor, plus one with probability equal to
        the remainder), so the expected count is exact even for small pools. Returns the sorted ids of the
        refreshed heads (LongTensor on the pool's device). `generator` drives the choice and the new weights;
        a CUDA generator costs one host sync (the chosen ids are grouped by level on the host).
        `optimizer`: SampledAdamW (moments and per-row step reset: exact) or a torch optimiser such as
        torch.optim.AdamW (moment rows zeroed; its single per-tensor step is not reset) -- see `reset_heads_`.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"HeadPool.refresh_: fraction must be a number in [0, 1], got {fraction!r}")
        draw_device = generator.device if generator is not None else torch.device("cpu")
        expected = fraction * self.num_heads
        count = int(math.floor(expected))
        remainder = expected - count
        if remainder > 0 and torch.rand((), generator=generator, device=draw_device).item() < remainder:
            count += 1
        count = min(count, self.num_heads)
        chosen = torch.randperm(self.num_heads, generator=generator, device=draw_device)[:count].cpu().sort().values
        self.reset_heads_(chosen, generator=generator, optimizer=optimizer)
        return chosen.to(self.device)

    def _check_optimizer(self, optimizer) -> None:
        mine = {id(p) for p in self.parameters()}
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not mine & held:
            raise ValueError("HeadPool: the optimizer given does not hold any of this pool's parameters")


def _reset_optimizer_rows(optimizer, param: torch.Tensor, rows: torch.Tensor) -> None:
    if not any(param is p for group in optimizer.param_groups for p in group["params"]):
        return  # optimised elsewhere (or frozen)
    if hasattr(optimizer, "reset_rows"):
        optimizer.reset_rows(param, rows)
        return
    state = optimizer.state.get(param)
    if not state:
        return
    index = rows.to(param.device)
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.index_fill_(0, index.to(value.device), 0)
