"""NitroFusion's dynamic adversarial discriminator: a frozen UNet encoder + mid block as feature backbone and
a large pool of light heads, a sampled subset of which is trained each iteration.

    disc = DynamicDiscriminator(teacher_unet)                 # SDXL: 10 levels, 480 heads, 120 sampled
    heads_opt = nitrokernels.optim.SampledAdamW(disc.head_parameters(), lr=1e-5)
    sel = disc.sample(generator=g)                            # every t* group, 1 head per level per kind
    out = disc.d_loss(real, fake.detach(), cond, uncond, selection=sel)    # heads train on real vs fake
    out.d_loss.backward(); heads_opt.step(); heads_opt.zero_grad()
    disc.record_updates(sel)                                  # head ages, read by the refresh policy
    out = disc.g_loss(fake, cond, uncond, selection=sel)     # gradients reach `fake` only
    out.g_loss.backward()
    disc.refresh(optimizer=heads_opt, generator=g)            # ~1% of the old-enough heads re-initialised

`cond` / `uncond` are the UNet's conditioning kwargs for the prompt and for the empty prompt:
{"encoder_hidden_states": [B, L, D]} for a class- or text-conditional UNet, plus
{"added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}} for SDXL (anything the UNet's embedding layers
take: class_labels, timestep_cond, ...).

What the paper fixes and what we chose (every choice is a constructor argument):
  * backbone: the frozen teacher's conv_in + down blocks + mid block (its up blocks never run); features are
    conv_in's output, every down-block residual (resnet and downsampler outputs) and the mid block's output
    (10 maps for SDXL). `levels` is derived from the backbone and `resolution` (default: the UNet's
    sample_size); one given by the caller must match it exactly.
  * t* in (10, 250, 500, 750): clean latents are re-noised to t* with the backbone's noise schedule (default
    Stable Diffusion's scaled_linear 0.00085..0.012; pass `alphas_cumprod` for another) and the backbone
    sees timestep t*. Choice: real and fake get independent noise; conditional and unconditional features of
    one input share its noise.
  * pool: per (t*, kind) a HeadPool with `pool_sizes[kind]` heads per level (paper: 4 -> 480 heads for SDXL).
    Kinds: "global_conditional" (one logit per image, prompt features), "local_conditional" (a
    local_size x local_size map of patch logits, prompt features), "local_unconditional" (patch logits on
    empty-prompt features). A size of 0 disables a kind.
  * sampling (the paper says "a subset per t*"): each iteration uses `t_star_sampled` of the t* groups
    (default None = every group) and, in each, draws `heads_sampled` heads per level per kind (default 1): 120 of
    480 heads for SDXL. Why every group: with one group of four per iteration a head is drawn 1/16 of the
    iterations, so under a 1%-per-iteration refresh it lives ~100 iterations and gets ~6 updates -- the student
    outruns such heads and the discriminator loss sits at chance (measured on the digits demo, see the README).
  * loss: "nonsaturating" (DMD2's form; default) L_D = softplus(-D(real)) + softplus(D(fake)),
    L_G = softplus(-D(fake)); or "hinge" L_D = relu(1 - D(real)) + relu(1 + D(fake)), L_G = -D(fake).
    Each head's loss is averaged over batch (and patches) and the heads' losses are summed
    (`head_reduction="sum"`, the paper's "sums over the sampled heads"; "mean" averages them).
  * refresh: `refresh()` re-initialises about refresh_rate of every pool's heads (stochastic rounding, so the
    expected count is exact) and resets their optimiser rows, choosing only among heads that have had at least
    `refresh_min_updates` updates since their initialisation (counted by `record_updates(selection)` after each
    heads optimiser step; NitroDistiller does it). A head is thus never thrown away before it has learnt
    anything; `refresh_min_updates=0` is the paper's plain uniform refresh. The update counts ("head ages") are
    part of `heads_state_dict()` and are reported as the `head_age` diagnostic.
  * heads: hidden width 256, GroupNorm(32), local_size 8 (SDXL); parameters in `head_dtype` (float32 by
    default; features are cast to it). The head math runs through nitrokernels.ops.head_levels (all sampled
    heads of a pool, every level, in one op call; dispatch name "head_stack"), whose backend (fused Triton /
    eager reference) follows nitrokernels.use_backend, or `head_backend` here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nitrokernels.nn.head_pool import HeadPool, HeadSample

__all__ = ["DynamicDiscriminator", "DiscriminatorOutput", "HeadSelection", "KINDS", "backbone_levels",
           "sd_alphas_cumprod"]

KINDS = ("global_conditional", "local_conditional", "local_unconditional")
_POOL_KIND = {"global_conditional": "global", "local_conditional": "local", "local_unconditional": "local"}
LOSSES = ("nonsaturating", "hinge")


def sd_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
    """Stable Diffusion's (scaled_linear) cumulative alphas, float64 [T]."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def backbone_levels(unet, resolution: int | None = None) -> tuple[tuple[int, int], ...]:
    """(channels, size) of every feature map the backbone (conv_in + down blocks + mid) gives at `resolution`."""
    size = int(resolution or unet.config.sample_size)
    levels = [(unet.conv_in.out_channels, size)]
    for block in unet.down_blocks:
        for resnet in block.resnets:
            levels.append((resnet.out_channels, size))
        for down in (getattr(block, "downsamplers", None) or []):
            size = (size + 1) // 2  # 3x3 stride 2 pad 1 conv (or 2x2 pool: same for even sizes)
            levels.append((down.out_channels, size))
    if unet.mid_block is not None:
        levels.append((unet.mid_block.resnets[-1].out_channels, size))
    return tuple(levels)


@dataclass
class HeadSelection:
    """The heads sampled for one iteration: t* groups (indices into t_star) and per (t* index, kind) the ids."""

    t_indices: tuple[int, ...]
    ids: dict[tuple[int, str], HeadSample]


@dataclass
class DiscriminatorOutput:
    """Losses (None when not computed) and per-kind diagnostics (detached 0-d tensors: no host sync until read).

    diagnostics[kind] keys: "d_loss", "g_loss", "real_logit", "fake_logit" (means), "d_accuracy" (fraction of
    real logits > 0 and fake logits < 0, averaged), "heads" (heads scored). t_star_accuracy (d_loss only): the
    d_accuracy of each sampled t* group, averaged over the kinds -- where the noise of a high t* hides the
    difference between real and fake, its heads sit at chance (python/separability_probe.py measures that ceiling).
    """

    d_loss: torch.Tensor | None = None
    g_loss: torch.Tensor | None = None
    diagnostics: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    t_star: tuple[int, ...] = ()
    t_star_accuracy: dict[int, torch.Tensor] = field(default_factory=dict)

    def as_floats(self) -> dict[str, float]:
        """Flat {"d_loss", "g_loss", "<kind>/<name>", "d_accuracy_t<t*>"} as Python floats (one host sync)."""
        flat = {}
        if self.d_loss is not None:
            flat["d_loss"] = self.d_loss
        if self.g_loss is not None:
            flat["g_loss"] = self.g_loss
        for kind, stats in self.diagnostics.items():
            for name, value in stats.items():
                flat[f"{kind}/{name}"] = value
        flat.update(t_star_accuracy_keys(self.t_star_accuracy))
        keys = list(flat)
        if not keys:
            return {}
        values = torch.stack([torch.as_tensor(flat[k]).detach().float().reshape(()).cpu() for k in keys]).tolist()
        return dict(zip(keys, values))


class DynamicDiscriminator(nn.Module):
    """Frozen UNet encoder+mid backbone + pooled heads per (t*, kind); see the module docstring.

    Args:
        backbone_unet: a diffusers UNet2DConditionModel (usually the teacher). Frozen here (requires_grad
            False, eval mode); its up blocks are never run.
        levels: expected [(channels, size)] of the feature maps; None derives them from the backbone.
        t_star: re-noising timesteps, one head group each.
        pool_sizes: heads per level per t* for each kind (int = all kinds); 0 disables a kind.
        heads_sampled: heads drawn per level per kind in each sampled t* group (int or per kind).
        t_star_sampled: t* groups used per iteration (None = all, the default).
        refresh_rate: fraction of heads re-initialised by refresh(), in [0, 1].
        refresh_min_updates: only heads with at least this many recorded updates are refreshed (0 = any head).
        local_size: patch-logit map size of local heads. hidden, num_groups: head width / GroupNorm groups.
        loss: "nonsaturating" | "hinge". head_reduction: "sum" | "mean" over sampled heads.
        resolution: latent size the features are computed at (default: backbone's sample_size).
        alphas_cumprod: the noise schedule for re-noising ([T] tensor); default Stable Diffusion's.
        head_dtype: dtype of the heads' parameters (features are cast to it). head_backend: force the
            head_stack backend ("triton", "eager") for every head call of this module; None = dispatch.
        batch_backbone: run real/fake and prompt/empty-prompt backbone passes as one batch (faster; more memory).

    A backbone whose feature maps do not fit the default head sizing (a small UNet) raises a ValueError naming
    the arguments to change (local_size, resolution, pool_sizes, ...).

    State: the backbone is held, not registered as a child module, so ``state_dict()``, ``load_state_dict()``
    and ``parameters()`` cover the heads and their ages only; ``.to()`` / ``.cuda()`` / dtype casts still move
    the backbone. ``heads_state_dict()`` / ``load_heads_state_dict()`` save and load the heads on their own
    (see heads_state_dict for the recipe).
    """

    def __init__(self, backbone_unet: nn.Module, levels: Sequence[tuple[int, int]] | None = None,
                 t_star: Sequence[int] = (10, 250, 500, 750), pool_sizes: int | Mapping[str, int] = 4,
                 heads_sampled: int | Mapping[str, int] = 1, t_star_sampled: int | None = None,
                 refresh_rate: float = 0.01, refresh_min_updates: int = 16, local_size: int = 8, hidden: int = 256, num_groups: int = 32,
                 loss: str = "nonsaturating", head_reduction: str = "sum", resolution: int | None = None,
                 alphas_cumprod: torch.Tensor | None = None, head_dtype: torch.dtype = torch.float32,
                 head_backend: str | None = None, batch_backbone: bool = True):
        super().__init__()
        for attr in ("conv_in", "down_blocks", "mid_block", "time_embedding", "config"):
            if not hasattr(backbone_unet, attr):
                raise TypeError(f"DynamicDiscriminator: backbone_unet must be a diffusers UNet2DConditionModel-like "
                                f"module (missing .{attr}); got {type(backbone_unet).__name__}")
        for name, value in (("hidden", hidden), ("num_groups", num_groups), ("local_size", local_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DynamicDiscriminator: {name} must be a positive int, got {value!r}")
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
            raise ValueError(f"DynamicDiscriminator: resolution must be a positive int or None, got {resolution!r}")
        if not isinstance(head_dtype, torch.dtype) or not head_dtype.is_floating_point:
            raise ValueError(f"DynamicDiscriminator: head_dtype must be a floating torch.dtype, got {head_dtype!r}")
        if not isinstance(backbone_unet, nn.Module) or next(backbone_unet.parameters(), None) is None:
            raise TypeError(f"DynamicDiscriminator: backbone_unet must be an nn.Module with parameters, got "
                            f"{type(backbone_unet).__name__}")
        self.resolution = int(resolution or backbone_unet.config.sample_size)
        derived = backbone_levels(backbone_unet, self.resolution)
        if levels is not None:
            try:
                given = tuple((int(c), int(s)) for c, s in levels)
            except (TypeError, ValueError):
                raise ValueError(f"DynamicDiscriminator: levels must be (channels, size) pairs, got {levels!r}") from None
            if given != derived:
                raise ValueError(f"DynamicDiscriminator: levels {list(given)} do not match the backbone's feature maps "
                                 f"at resolution {self.resolution}: {list(derived)} (conv_in, every down-block "
                                 f"residual, mid block); pass levels=None to take them from the backbone")
        self.levels = derived

        # ---- t*, noise schedule
        alphas = (sd_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod)).double()
        if alphas.dim() != 1 or not len(alphas):
            raise ValueError(f"DynamicDiscriminator: alphas_cumprod must be a non-empty 1-D tensor, got {tuple(alphas.shape)}")
        try:
            t_list = list(t_star)
        except TypeError:
            raise ValueError(f"DynamicDiscriminator: t_star must be a sequence of int timesteps, got {t_star!r}") from None
        bad = [t for t in t_list if isinstance(t, bool) or not isinstance(t, (int, float, torch.Tensor)) or int(t) != t]
        if bad:
            raise ValueError(f"DynamicDiscriminator: t_star values must be ints, got {bad}")
        t_star = tuple(int(t) for t in t_list)
        if not t_star:
            raise ValueError("DynamicDiscriminator: t_star is empty (the paper uses (10, 250, 500, 750))")
        bad = [t for t in t_star if not 0 <= t < len(alphas)]
        if bad:
            raise ValueError(f"DynamicDiscriminator: t_star values {bad} are outside [0, {len(alphas) - 1}]")
        if len(set(t_star)) != len(t_star):
            raise ValueError(f"DynamicDiscriminator: t_star has repeated values: {t_star}")
        self.t_star = t_star
        self.register_buffer("alphas_cumprod", alphas.float(), persistent=False)
        if t_star_sampled is None:
            t_star_sampled = len(t_star)
        if isinstance(t_star_sampled, bool) or not isinstance(t_star_sampled, int) or not 1 <= t_star_sampled <= len(t_star):
            raise ValueError(f"DynamicDiscriminator: t_star_sampled must be an int in [1, {len(t_star)}] (or None = "
                             f"all), got {t_star_sampled!r}")
        self.t_star_sampled = t_star_sampled

        # ---- pools
        self.pool_sizes = self._per_kind("pool_sizes", pool_sizes, allow_zero=True)
        if not any(self.pool_sizes.values()):
            raise ValueError(f"DynamicDiscriminator: every pool is empty (pool_sizes={dict(self.pool_sizes)}); "
                             f"give at least one kind >= 1 head per level (the paper uses 4 of each)")
        self.heads_sampled = self._per_kind("heads_sampled", heads_sampled, allow_zero=False)
        for kind in KINDS:
            if self.pool_sizes[kind] and self.heads_sampled[kind] > self.pool_sizes[kind]:
                raise ValueError(f"DynamicDiscriminator: heads_sampled[{kind!r}]={self.heads_sampled[kind]} exceeds its "
                                 f"pool of {self.pool_sizes[kind]} heads per level (heads are drawn without repetition)")
        if isinstance(refresh_rate, bool) or not isinstance(refresh_rate, (int, float)) or not 0.0 <= refresh_rate <= 1.0:
            raise ValueError(f"DynamicDiscriminator: refresh_rate must be in [0, 1], got {refresh_rate!r}")
        self.refresh_rate = float(refresh_rate)
        if isinstance(refresh_min_updates, bool) or not isinstance(refresh_min_updates, int) or refresh_min_updates < 0:
            raise ValueError(f"DynamicDiscriminator: refresh_min_updates must be an int >= 0, got {refresh_min_updates!r}")
        self.refresh_min_updates = refresh_min_updates
        if loss not in LOSSES:
            raise ValueError(f"DynamicDiscriminator: loss must be one of {LOSSES}, got {loss!r}")
        self.loss = loss
        if head_reduction not in ("sum", "mean"):
            raise ValueError(f"DynamicDiscriminator: head_reduction must be 'sum' or 'mean', got {head_reduction!r}")
        self.head_reduction = head_reduction
        if head_backend is not None:
            from nitrokernels.ops.dispatch import BACKENDS
            if head_backend not in BACKENDS:
                raise ValueError(f"DynamicDiscriminator: head_backend must be one of {BACKENDS} or None, got {head_backend!r}")
        self.head_backend = head_backend
        self.batch_backbone = bool(batch_backbone)
        self.local_size = local_size
        device = next(backbone_unet.parameters()).device
        pools = {}
        for ti, t in enumerate(t_star):
            for kind in KINDS:
                if not self.pool_sizes[kind]:
                    continue
                try:
                    pools[self._key(ti, kind)] = HeadPool(
                        levels=self.levels, heads_per_level=self.pool_sizes[kind], hidden=hidden,
                        num_groups=num_groups, kind=_POOL_KIND[kind], local_size=local_size, device=device,
                        dtype=head_dtype)
                except ValueError as err:
                    raise ValueError(f"DynamicDiscriminator: cannot build the {kind} heads for this backbone: {err}. "
                                     f"{_sizing_hint(kind, self.levels, self.resolution, local_size)}") from None
        self.pools = nn.ModuleDict(pools)
        # updates since initialisation of every head of every pool (the refresh policy reads them)
        self.ages = nn.Module()
        for key, pool in pools.items():
            self.ages.register_buffer(key, torch.zeros(pool.num_heads, dtype=torch.long, device=device))
        self.hidden, self.num_groups, self.head_dtype = hidden, num_groups, head_dtype

        backbone_unet.requires_grad_(False).eval()
        # Held outside nn.Module's registries (a 1-tuple is a plain attribute): the frozen teacher is not a child
        # module, so it is not in state_dict() / load_state_dict() / parameters(); _apply below still moves it.
        self._frozen_backbone = (backbone_unet,)

    @property
    def backbone(self) -> nn.Module:
        """The frozen backbone UNet (usually the teacher). Not a child module: it is left out of state_dict(),
        load_state_dict() and parameters(), and moved / cast along with the discriminator by .to() / .cuda() /
        .half() and the like."""
        return self._frozen_backbone[0]

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .float() / ... act on the backbone too (it is shared with the caller: the teacher
        # moves, as it did when it was a child module)
        self._frozen_backbone[0]._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------------------------------- config
    @staticmethod
    def _key(t_index: int, kind: str) -> str:
        return f"t{t_index}_{kind}"

    @staticmethod
    def _per_kind(name, value, allow_zero) -> dict[str, int]:
        low = 0 if allow_zero else 1
        if isinstance(value, Mapping):
            unknown = set(value) - set(KINDS)
            if unknown:
                raise ValueError(f"DynamicDiscriminator: {name} has unknown kinds {sorted(unknown)}; kinds are {KINDS}")
            values = {kind: value.get(kind, 0 if name == "pool_sizes" else 1) for kind in KINDS}
        else:
            values = {kind: value for kind in KINDS}
        for kind, v in values.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"DynamicDiscriminator: {name}[{kind!r}] must be an int >= {low}, got {v!r}")
        return values

    @property
    def kinds(self) -> tuple[str, ...]:
        """The head kinds with a non-empty pool, in KINDS order."""
        return tuple(k for k in KINDS if self.pool_sizes[k])

    @property
    def num_heads(self) -> int:
        """Heads in all pools together."""
        return sum(pool.num_heads for pool in self.pools.values())

    @property
    def heads_per_iteration(self) -> int:
        """Heads scored per iteration: sampled t* groups x levels x heads sampled per kind."""
        return self.t_star_sampled * len(self.levels) * sum(self.heads_sampled[k] for k in self.kinds)

    def head_parameters(self):
        """The trainable parameters (all pools' heads; the backbone is frozen)."""
        return self.pools.parameters()

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """The pools' parameters plus every head's update count ("ages.<pool>"): all a resumed run needs.

        Heads-only save / load (the frozen backbone is the teacher: save it, if at all, as the teacher)::

            torch.save(disc.heads_state_dict(), "heads.pt")
            disc = DynamicDiscriminator(teacher, **same_kwargs)
            disc.load_heads_state_dict(torch.load("heads.pt", weights_only=True))

        ``disc.state_dict()`` holds the same tensors under the module's own names ("pools.*", "ages.*"); neither
        includes the backbone.
        """
        return {**self.pools.state_dict(), **{f"ages.{k}": v for k, v in self.ages.state_dict().items()}}

    def load_heads_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load heads_state_dict() output (see its docstring for the save / load recipe); a state without
        "ages.*" entries (older files) loads with ages 0. The pools' keys and shapes must match (strict)."""
        ages = {k[len("ages."):]: v for k, v in state.items() if k.startswith("ages.")}
        pools = {k: v for k, v in state.items() if not k.startswith("ages.")}
        if ages:
            mine = self.ages.state_dict()
            if set(ages) != set(mine) or any(ages[k].shape != mine[k].shape for k in mine):
                raise ValueError(f"DynamicDiscriminator.load_heads_state_dict: head ages for pools {sorted(ages)} "
                                 f"do not match this discriminator's pools {sorted(mine)}")
        self.pools.load_state_dict(pools)
        for key, buf in self.ages.named_buffers():
            buf.copy_(ages[key]) if ages else buf.zero_()

    def train(self, mode: bool = True) -> "DynamicDiscriminator":
        """nn.Module.train for the heads; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()  # frozen: dropout / norms stay in inference mode
        return self

    def extra_repr(self) -> str:
        return (f"backbone={type(self.backbone).__name__} (frozen, not in state_dict), levels={list(self.levels)}, t_star={self.t_star}, pool_sizes={dict(self.pool_sizes)}, "
                f"heads_sampled={dict(self.heads_sampled)}, t_star_sampled={self.t_star_sampled}, "
                f"num_heads={self.num_heads}, refresh_rate={self.refresh_rate}, "
                f"refresh_min_updates={self.refresh_min_updates}, loss={self.loss!r}")

    # ------------------------------------------------------------------------------------------ backbone
    def features(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                 added_cond_kwargs: dict | None = None, class_labels: torch.Tensor | None = None,
                 timestep_cond: torch.Tensor | None = None, **unused) -> list[torch.Tensor]:
        """The backbone's feature maps (conv_in, down-block residuals, mid) for `sample` at `timestep`.

        Re-implements the first half of UNet2DConditionModel.forward over its modules (same embeddings,
        same blocks), so the up blocks never run.
        """
        if unused:
            raise TypeError(f"DynamicDiscriminator.features: unsupported conditioning kwargs {sorted(unused)}")
        u = self.backbone
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
            raise ValueError(f"DynamicDiscriminator.features: sample must be a 4-D tensor [B, C, H, W], got "
                             f"{tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__}")
        batch = sample.shape[0]
        in_channels = getattr(u.config, "in_channels", None)
        if isinstance(in_channels, int) and sample.shape[1] != in_channels:
            raise ValueError(f"DynamicDiscriminator.features: sample has {sample.shape[1]} channels, the backbone's "
                             f"in_channels is {in_channels}")
        width = getattr(u.config, "cross_attention_dim", None)
        if isinstance(encoder_hidden_states, torch.Tensor) and isinstance(width, int) and \
                encoder_hidden_states.shape[-1] != width:
            raise ValueError(f"DynamicDiscriminator.features: encoder_hidden_states have width "
                             f"{encoder_hidden_states.shape[-1]} (shape {tuple(encoder_hidden_states.shape)}), the "
                             f"backbone's cross_attention_dim is {width}")
        if isinstance(encoder_hidden_states, torch.Tensor) and encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"DynamicDiscriminator.features: encoder_hidden_states have batch "
                             f"{encoder_hidden_states.shape[0]}, the sample {batch}")
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        timestep = timestep.to(sample.device).reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.to(sample.device)
        t_emb = u.get_time_embed(sample=sample, timestep=timestep)
        emb = u.time_embedding(t_emb, timestep_cond)
        class_emb = u.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if u.config.class_embeddings_concat else emb + class_emb
        aug_emb = u.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                  added_cond_kwargs=added_cond_kwargs or {})
        if u.config.addition_embed_type == "image_hint":
            raise NotImplementedError("DynamicDiscriminator: image_hint addition embeddings are not supported")
        if aug_emb is not None:
            emb = emb + aug_emb
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        encoder_hidden_states = u.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                                added_cond_kwargs=added_cond_kwargs or {})
        x = u.conv_in(sample)
        feats = [x]
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                x, res = block(hidden_states=x, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                x, res = block(hidden_states=x, temb=emb)
            feats.extend(res)
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                x = u.mid_block(x, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                x = u.mid_block(x, emb)
            feats.append(x)
        if len(feats) != len(self.levels):
            raise RuntimeError(f"DynamicDiscriminator: the backbone gave {len(feats)} feature maps, expected "
                               f"{len(self.levels)}")
        return feats

    def renoise(self, x0: torch.Tensor, t: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """sqrt(a_t) x0 + sqrt(1 - a_t) eps with eps ~ N(0, 1) from `generator`."""
        a = self.alphas_cumprod[t].to(x0.device)
        gen_device = generator.device if generator is not None else x0.device
        eps = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        return a.sqrt().to(x0.dtype) * x0 + (1 - a).sqrt().to(x0.dtype) * eps

    # ----------------------------------------------------------------------------------------- sampling
    def sample(self, generator: torch.Generator | None = None, host_generator: torch.Generator | None = None,
               device=None) -> HeadSelection:
        """Draw this iteration's t* groups and heads.

        `host_generator` (a CPU generator; default: `generator` if it is a CPU one) picks the t* groups on the
        host; `generator` draws the head ids on the pools' device (no host sync).
        """
        device = torch.device(device) if device is not None else self.alphas_cumprod.device
        if host_generator is None and generator is not None and generator.device.type == "cpu":
            host_generator = generator
        if self.t_star_sampled == len(self.t_star):
            t_indices = tuple(range(len(self.t_star)))
        else:
            perm = torch.randperm(len(self.t_star), generator=host_generator)
            t_indices = tuple(sorted(perm[:self.t_star_sampled].tolist()))
        ids = {}
        for ti in t_indices:
            for kind in self.kinds:
                pool = self.pools[self._key(ti, kind)]
                ids[(ti, kind)] = pool.sample(self.heads_sampled[kind], generator=generator, device=pool.device)
        return HeadSelection(t_indices, ids)

    # ------------------------------------------------------------------------------------------- losses
    def _d_terms(self, real_logits, fake_logits):
        if self.loss == "nonsaturating":
            return F.softplus(-real_logits), F.softplus(fake_logits)
        return F.relu(1 - real_logits), F.relu(1 + fake_logits)

    def _g_term(self, fake_logits):
        return F.softplus(-fake_logits) if self.loss == "nonsaturating" else -fake_logits

    def _reduce(self, per_element: torch.Tensor) -> torch.Tensor:
        per_head = per_element.reshape(per_element.shape[0], -1).mean(dim=1)
        return per_head.sum() if self.head_reduction == "sum" else per_head.mean()

    def backend_context(self):
        """A context forcing `head_backend` for head_stack (a no-op when it is None). The losses' BACKWARD picks
        its head backend when it runs: wrap `loss.backward()` in this context too (NitroDistiller does)."""
        return self._backend_ctx()

    def _backend_ctx(self):
        if self.head_backend is None:
            return contextlib.nullcontext()
        from nitrokernels.ops.dispatch import use_backend
        import nitrokernels.ops.heads  # noqa: F401  (registers head_stack)
        return use_backend(self.head_backend, "head_stack")

    @contextlib.contextmanager
    def _frozen_heads(self):
        params = list(self.pools.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)

    def _check_inputs(self, name, x, cond, uncond):
        if x.dim() != 4:
            raise ValueError(f"DynamicDiscriminator: {name} must be [B, C, H, W] latents, got {tuple(x.shape)}")
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise ValueError(f"DynamicDiscriminator: {name} is {x.shape[-2]}x{x.shape[-1]} but the discriminator was "
                             f"built for {self.resolution}x{self.resolution} latents (pass resolution=...)")
        batch = x.shape[0]
        for label, kwargs in (("cond", cond), ("uncond", uncond)):
            if kwargs is None:
                continue
            if not isinstance(kwargs, Mapping):
                raise TypeError(f"DynamicDiscriminator: {label} must be a dict of UNet conditioning kwargs "
                                f"(encoder_hidden_states=..., added_cond_kwargs=...), got {type(kwargs).__name__}")
            for key, value in _flat_tensors(kwargs):
                if value.shape[0] != batch:
                    raise ValueError(f"DynamicDiscriminator: {label}[{key!r}] has batch {value.shape[0]} but {name} "
                                     f"has batch {batch}: prompts and latents must match")
        if uncond is None and self.pool_sizes["local_unconditional"]:
            raise ValueError("DynamicDiscriminator: the local_unconditional heads need `uncond` (the empty prompt's "
                             "conditioning kwargs); pass it or set pool_sizes['local_unconditional']=0")

    def _backbone(self, inputs: list[torch.Tensor], conds: list[dict], t: int) -> list[list[torch.Tensor]]:
        """Features of each (input, cond) pair (batched into one backbone call when batch_backbone)."""
        if self.batch_backbone and len(inputs) > 1:
            feats = self.features(torch.cat(inputs), t, **_cat_kwargs(conds))
            sizes = [x.shape[0] for x in inputs]
            return [list(parts) for parts in zip(*[f.split(sizes) for f in feats])]
        return [self.features(x, t, **c) for x, c in zip(inputs, conds)]

    def _cast(self, feats):
        return [f if f.dtype == self.head_dtype else f.to(self.head_dtype) for f in feats]

    def _heads(self, ti, kind, feats, selection):
        return self.pools[self._key(ti, kind)](self._cast(feats), selection.ids[(ti, kind)])

    def _uses(self):
        cond_kinds = [k for k in self.kinds if k.endswith("_conditional") and not k.endswith("unconditional")]
        return cond_kinds, [k for k in self.kinds if k.endswith("unconditional")]

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor, cond: Mapping, uncond: Mapping | None = None, *,
               selection: HeadSelection | None = None, generator: torch.Generator | None = None) -> DiscriminatorOutput:
        """Discriminator loss of the sampled heads on real vs fake (both treated as constants; the backbone
        runs without autograd). Gradients go to the sampled heads only."""
        real, fake = real.detach(), fake.detach()
        if real.shape != fake.shape:
            raise ValueError(f"DynamicDiscriminator: real {tuple(real.shape)} and fake {tuple(fake.shape)} differ")
        self._check_inputs("real", real, cond, uncond)
        self._check_inputs("fake", fake, cond, uncond)
        selection = selection or self.sample(generator)
        cond_kinds, uncond_kinds = self._uses()
        out = DiscriminatorOutput(t_star=tuple(self.t_star[i] for i in selection.t_indices))
        total, stats = [], {k: {} for k in self.kinds}
        batch = real.shape[0]
        for ti in selection.t_indices:
            t = self.t_star[ti]
            accuracies = []
            both = torch.cat([self.renoise(real, t, generator), self.renoise(fake, t, generator)])
            inputs, conds = [], []
            if cond_kinds:
                inputs.append(both)
                conds.append(_cat_kwargs([cond, cond]))
            if uncond_kinds:
                inputs.append(both)
                conds.append(_cat_kwargs([uncond, uncond]))
            with torch.no_grad():
                feats = self._backbone(inputs, conds, t)
            feats = [[f.detach() for f in fs] for fs in feats]
            with self._backend_ctx():
                for kinds, fs in ((cond_kinds, feats[0] if cond_kinds else None),
                                  (uncond_kinds, feats[-1] if uncond_kinds else None)):
                    for kind in kinds:
                        logits = self._heads(ti, kind, fs, selection)
                        real_l, fake_l = logits[:, :batch], logits[:, batch:]
                        lr, lf = self._d_terms(real_l, fake_l)
                        loss = self._reduce(lr) + self._reduce(lf)
                        total.append(loss)
                        _accumulate(stats[kind], "d_loss", loss.detach())
                        _accumulate(stats[kind], "real_logit", real_l.detach().float().mean())
                        _accumulate(stats[kind], "fake_logit", fake_l.detach().float().mean())
                        acc = 0.5 * ((real_l > 0).float().mean() + (fake_l < 0).float().mean())
                        accuracies.append(acc.detach())
                        _accumulate(stats[kind], "d_accuracy", acc.detach(), mean_over=len(selection.t_indices))
                        _accumulate(stats[kind], "logit_gap", (real_l.detach().float().mean()
                                                               - fake_l.detach().float().mean()))
                        _accumulate(stats[kind], "head_age", self._ages_of(ti, kind, selection).float().mean())
                        _accumulate(stats[kind], "heads", torch.tensor(float(logits.shape[0])))
            out.t_star_accuracy[t] = torch.stack(accuracies).mean()
        out.d_loss = torch.stack(total).sum()
        out.diagnostics = _finish(stats, len(selection.t_indices))
        return out

    def g_loss(self, fake: torch.Tensor, cond: Mapping, uncond: Mapping | None = None, *,
               selection: HeadSelection | None = None, generator: torch.Generator | None = None) -> DiscriminatorOutput:
        """Generator loss of `fake` under the sampled heads: gradients flow to `fake` only (the backbone and
        the heads are held constant)."""
        self._check_inputs("fake", fake, cond, uncond)
        selection = selection or self.sample(generator)
        cond_kinds, uncond_kinds = self._uses()
        out = DiscriminatorOutput(t_star=tuple(self.t_star[i] for i in selection.t_indices))
        total, stats = [], {k: {} for k in self.kinds}
        for ti in selection.t_indices:
            t = self.t_star[ti]
            noised = self.renoise(fake, t, generator)
            inputs, conds = [], []
            if cond_kinds:
                inputs.append(noised)
                conds.append(dict(cond))
            if uncond_kinds:
                inputs.append(noised)
                conds.append(dict(uncond))
            feats = self._backbone(inputs, conds, t)
            with self._backend_ctx(), self._frozen_heads():
                for kinds, fs in ((cond_kinds, feats[0] if cond_kinds else None),
                                  (uncond_kinds, feats[-1] if uncond_kinds else None)):
                    for kind in kinds:
                        logits = self._heads(ti, kind, fs, selection)
                        loss = self._reduce(self._g_term(logits))
                        total.append(loss)
                        _accumulate(stats[kind], "g_loss", loss.detach())
                        _accumulate(stats[kind], "fake_logit", logits.detach().float().mean())
        out.g_loss = torch.stack(total).sum()
        out.diagnostics = _finish(stats, len(selection.t_indices))
        return out

    def forward(self, real: torch.Tensor, fake: torch.Tensor, cond: Mapping, uncond: Mapping | None = None, *,
                selection: HeadSelection | None = None, generator: torch.Generator | None = None,
                ) -> DiscriminatorOutput:
        """Both losses for one iteration with the same sampled heads: d_loss (on detached inputs) then g_loss."""
        selection = selection or self.sample(generator)
        d = self.d_loss(real, fake, cond, uncond, selection=selection, generator=generator)
        g = self.g_loss(fake, cond, uncond, selection=selection, generator=generator)
        diagnostics = {k: {**d.diagnostics.get(k, {}), **{n: v for n, v in g.diagnostics.get(k, {}).items()
                                                           if n != "fake_logit"}} for k in self.kinds}
        return DiscriminatorOutput(d.d_loss, g.g_loss, diagnostics, d.t_star)

    # ------------------------------------------------------------------------------------------ refresh
    def _ages_of(self, ti: int, kind: str, selection: HeadSelection) -> torch.Tensor:
        ids = selection.ids[(ti, kind)]
        return getattr(self.ages, self._key(ti, kind))[ids.as_subclass(torch.Tensor)]

    @torch.no_grad()
    def record_updates(self, selection: HeadSelection) -> None:
        """Count one update for every head of `selection` (call it after each heads optimiser step; no host sync)."""
        for (ti, kind), ids in selection.ids.items():
            ages = getattr(self.ages, self._key(ti, kind))
            ids = ids.as_subclass(torch.Tensor).to(ages.device)
            ages.index_add_(0, ids, torch.ones_like(ids))

    def head_ages(self) -> dict[str, torch.Tensor]:
        """{pool key: updates since initialisation of each of its heads} (LongTensors on the pools' device)."""
        return dict(self.ages.named_buffers())

    @torch.no_grad()
    def refresh(self, optimizer=None, generator: torch.Generator | None = None, rate: float | None = None) -> int:
        """Re-initialise about `rate` (default refresh_rate) of every pool's heads, chosen among the heads with at
        least `refresh_min_updates` recorded updates, reset their rows in `optimizer` and their ages. The count per
        pool is rate * heads rounded stochastically (exact in expectation), capped by the eligible heads.
        `generator` (a CPU one is best: the choice is made on the host) drives the choice and the new weights.
        Returns the number of heads refreshed (one host sync per pool)."""
        rate = self.refresh_rate if rate is None else rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"DynamicDiscriminator.refresh: rate must be in [0, 1], got {rate!r}")
        if rate == 0.0:
            return 0
        draw_device = generator.device if generator is not None else torch.device("cpu")
        count = 0
        for key, pool in self.pools.items():
            ages = getattr(self.ages, key)
            expected = rate * pool.num_heads
            n = int(expected)
            if torch.rand((), generator=generator, device=draw_device).item() < expected - n:
                n += 1
            eligible = (ages >= self.refresh_min_updates).nonzero().flatten().cpu()
            n = min(n, eligible.numel())
            if n == 0:
                continue
            order = torch.randperm(eligible.numel(), generator=generator, device=draw_device).cpu()
            chosen = eligible[order[:n]].sort().values
            pool.reset_heads_(chosen, generator=generator, optimizer=optimizer)
            ages.index_fill_(0, chosen.to(ages.device), 0)
            count += n
        return count


def _sizing_hint(kind: str, levels, resolution: int, local_size: int) -> str:
    """What to pass when the default head sizing does not fit a (small) backbone."""
    from nitrokernels.nn.head_pool import _power_of_two_steps

    sizes = sorted({s for _, s in levels})
    drop = [k for k in KINDS if _POOL_KIND[k] == _POOL_KIND[kind]]
    off = "or pool_sizes={" + ", ".join(f"{k!r}: 0" for k in drop) + ", ...} to drop these heads"
    if _POOL_KIND[kind] == "global":
        return (f"Global heads need every feature map to be 4 * 2**k with k >= 1 (8, 16, 32, ...); the backbone's "
                f"maps are {sizes} at resolution={resolution}: pass a resolution=... that gives such sizes, {off} "
                f"(the sizing arguments: resolution, pool_sizes, local_size, hidden, num_groups)")
    fits = [t for t in range(sizes[0] - 1, 0, -1) if all(_power_of_two_steps(s, t) is not None for s in sizes)]
    suggestion = f"local_size={fits[0]} (the largest that fits), " if fits else ""
    return (f"Local heads need every feature map to be local_size * 2**k with k >= 1; the backbone's maps are "
            f"{sizes} at resolution={resolution} and local_size={local_size}: pass {suggestion}a larger "
            f"resolution=..., {off} (the sizing arguments: local_size, resolution, pool_sizes, hidden, num_groups)")


def _flat_tensors(kwargs: Mapping, prefix: str = ""):
    for key, value in kwargs.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, Mapping):
            yield from _flat_tensors(value, name + ".")


def _cat_kwargs(kwargs_list: Sequence[Mapping]) -> dict:
    """Concatenate conditioning kwargs along the batch (recursively into dicts such as added_cond_kwargs)."""
    if len(kwargs_list) == 1:
        return dict(kwargs_list[0])
    first = kwargs_list[0]
    keys = set(first)
    for other in kwargs_list[1:]:
        if set(other) != keys:
            raise ValueError(f"DynamicDiscriminator: cond and uncond must have the same keys, got {sorted(keys)} and "
                             f"{sorted(other)}")
    out = {}
    for key, value in first.items():
        values = [kw[key] for kw in kwargs_list]
        if isinstance(value, torch.Tensor):
            out[key] = torch.cat(values)
        elif isinstance(value, Mapping):
            out[key] = _cat_kwargs(values)
        elif value is None:
            out[key] = None
        else:
            raise TypeError(f"DynamicDiscriminator: cannot batch conditioning value {key!r} of type {type(value).__name__}")
    return out


_MEAN_OVER_GROUPS = ("real_logit", "fake_logit", "d_accuracy", "logit_gap", "head_age")


T_STAR_ACCURACY_PREFIX = "d_accuracy_t"   # log key of a t* group's accuracy: "d_accuracy_t<t*>" (no head kind)


def t_star_accuracy_keys(t_star_accuracy: dict) -> dict:
    """{t*: accuracy} as the flat log keys {"d_accuracy_t<t*>": accuracy}."""
    return {f"{T_STAR_ACCURACY_PREFIX}{t}": v for t, v in t_star_accuracy.items()}


def t_star_of_key(key: str) -> int | None:
    """The t* of a "d_accuracy_t<t*>" log key; None for any other key."""
    rest = key[len(T_STAR_ACCURACY_PREFIX):]
    return int(rest) if key.startswith(T_STAR_ACCURACY_PREFIX) and rest.isdigit() else None


def _accumulate(stats: dict, name: str, value: torch.Tensor, mean_over: int = 1):
    stats[name] = stats[name] + value if name in stats else value


def _finish(stats: dict, groups: int) -> dict:
    out = {}
    for kind, values in stats.items():
        if not values:
            continue
        out[kind] = {name: (v / groups if name in _MEAN_OVER_GROUPS else v)
                     for name, v in values.items()}
    return out
