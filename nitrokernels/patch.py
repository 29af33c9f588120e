"""Install nitrokernels' fused blocks into already-loaded diffusers models, and take them out again.

    handle = nitrokernels.patch_unet(unet)          # attention processors, GEGLU, ResnetBlock2D, GroupNorm+SiLU
    print(handle.summary())                         # what was patched, what was skipped and why
    handle.revert()                                 # the exact original modules / processors are back

What is patched (each block is decided on its own; one unsupported block does not stop the others):
  * attention  -- every diffusers `Attention` whose processor is `AttnProcessor2_0` or `AttnProcessor` (the
    stock processors) gets a `NitroAttnProcessor`, installed through the model's `set_attn_processor`
    (`set_processor` per module where the model has none). Other processors (added-KV, IP-adapter, custom,
    sliced, xformers, fused-QKV, ...) keep theirs.
  * geglu      -- every diffusers `GEGLU` module (the first layer of the transformer blocks' FeedForward) is
    replaced by `FusedGEGLU.from_diffusers(geglu)`, which shares its parameters.
  * group_norm -- every diffusers `ResnetBlock2D` gets the fused forward of `nitrokernels.nn.resnet`
    (`fuse_resnet_block`, when `resnet_block_unsupported_reason` has no objection), and the
    `conv_norm_out` + `conv_act` pair of UNet2DConditionModel and the VAE Encoder / Decoder becomes one
    `GroupNormSiLU` (sharing the GroupNorm's parameters) followed by an Identity -- only where the owner's
    forward is diffusers' own (so the pair is known to run back to back) and the pair is exactly
    `nn.GroupNorm` then `nn.SiLU`.
A block is skipped when forward hooks on the modules that the fused path bypasses would silently stop
firing. State-dict keys do not change, so a patched model saves and loads like the original.

After patching, the user keeps working on the model (LoRA adapters, layerwise casting, CPU / group offloading,
processors, torch.compile, torch.save): every fused forward checks at CALL time the few submodules and tensors it
bypasses -- hooks (torch's, accelerate's AlignDevicesHook, diffusers' hook registry: layerwise casting, group
offloading), wrappers (a PEFT / LoRA layer in place of `proj`, `to_q`, a norm), parameters on the meta device, on
another device or in a storage dtype that is not the compute dtype -- and then calls through the submodule or
runs the original computation for that call. `handle.fallbacks` lists (path, what, reason, calls) and
`handle.summary()` shows them; the first occurrence of each is logged at INFO on the "nitrokernels" logger.
Patched attention concatenates the QKV weights on every call (no cache: writes through `.data`, as peft's
fuse_lora / unload do, are invisible to any cheap check), so merged / unloaded adapters are always seen.

A patched model pickles (torch.save(model) / torch.load(..., weights_only=False)) and deep-copies; a copy keeps
its fused blocks and is not tied to the handle: `unpatch(copy)` takes them out. `revert()` restores the
original objects, carrying over what changed meanwhile: parameters assigned to a fused module
(load_state_dict(assign=True)), a `proj` wrapped by a LoRA layer; a processor the user installed after
patching (set_attn_processor, set_default_attn_processor) is kept, only nitrokernels' own are replaced.

Supported-or-not: `strict=False` (default) skips unsupported blocks, logs them on the "nitrokernels" logger
and records them in `handle.report`; `strict=True` raises `UnsupportedBlockError` naming every unsupported
block and its reason, before anything is changed.

`handle.report` is a list of `(module path, what, "patched" | reason)`, what in
{"attention", "geglu", "resnet", "group_norm_silu"}.

Patching twice is refused: a model (or any module inside it) that is part of a live patch raises
`AlreadyPatchedError`; `revert()` the first handle to patch again. `revert()` puts back the original module
objects, processor objects and forwards, so outputs are bit-identical to before patching; it is idempotent.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

try:
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
except ImportError as err:  # pragma: no cover - the dependency is optional for the kernels themselves
    raise ImportError("nitrokernels.patch needs diffusers (pip install 'nitrokernels[nitro]')") from err

log = logging.getLogger("nitrokernels")

__all__ = ["AlreadyPatchedError", "PatchHandle", "UnsupportedBlockError", "patch_unet", "patch_vae", "unpatch"]

PATCHED = "patched"
# The processors NitroAttnProcessor stands in for (same inputs, same math).
_STOCK_PROCESSORS = (AttnProcessor2_0, AttnProcessor)
# Owners whose own forward runs `conv_norm_out` then `conv_act` back to back, with nothing in between.
_NORM_ACT_FORWARDS = {UNet2DConditionModel.forward, Encoder.forward, Decoder.forward}

# Every module that belongs to a live (not reverted) patch -> its handle.
_LIVE: "weakref.WeakKeyDictionary[nn.Module, PatchHandle]" = weakref.WeakKeyDictionary()


class UnsupportedBlockError(ValueError):
    """strict=True and at least one block cannot be patched; the message names each block and why."""


class AlreadyPatchedError(RuntimeError):
    """The model (or a module inside it) is already patched by a handle that was not reverted."""


@dataclass
class PatchHandle:
    """What a patch did, and how to undo it. `report`: [(module path, what, "patched" | reason)]."""

    model: nn.Module
    report: list[tuple[str, str, str]] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    reverted: bool = False
    # (path, what, the module whose call-time fallbacks are recorded), for `fallbacks`
    _blocks: list[tuple[str, str, nn.Module]] = field(default_factory=list, repr=False)

    @property
    def fallbacks(self) -> list[tuple[str, str, str, int]]:
        """[(path, what, reason, calls)]: patched blocks that ran the original computation (or called through a
        submodule instead of the fused path) at call time, and why -- hooks, wrappers, offloading or storage
        dtypes added after patching. Empty while every call took the fused path."""
        from nitrokernels.nn import _calltime

        out = []
        for path, what, module in self._blocks:
            for reason, calls in _calltime.reasons(module).items():
                out.append((path, what, reason, calls))
        return out

    @property
    def patched(self) -> list[tuple[str, str]]:
        return [(path, what) for path, what, status in self.report if status == PATCHED]

    @property
    def skipped(self) -> list[tuple[str, str, str]]:
        return [row for row in self.report if row[2] != PATCHED]

    def counts(self) -> dict[str, tuple[int, int]]:
        """{what: (patched, total)}."""
        out: dict[str, tuple[int, int]] = {}
        for _, what, status in self.report:
            done, total = out.get(what, (0, 0))
            out[what] = (done + (status == PATCHED), total + 1)
        return out

    def summary(self) -> str:
        lines = [f"{type(self.model).__name__}: " + ", ".join(
            f"{what} {done}/{total}" for what, (done, total) in self.counts().items()) + (
            " (reverted)" if self.reverted else "")]
        lines += [f"  skipped {what} {path}: {status}" for path, what, status in self.skipped]
        lines += [f"  fell back {what} {path or '<root>'}: {reason} ({calls} call{'s' * (calls != 1)})"
                  for path, what, reason, calls in self.fallbacks]
        return "\n".join(lines)

    def revert(self) -> None:
        """Restore the original modules, processors and forwards (idempotent)."""
        if self.reverted:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        for module in list(_LIVE.keys()):
            if _LIVE.get(module) is self:
                del _LIVE[module]
        self.reverted = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.revert()


# --------------------------------------------------------------------------------------------- helpers
def _hooks(module: nn.Module) -> bool:
    """torch hooks, or a forward replaced on the instance (accelerate's and diffusers' hooks work that way)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None) or "forward" in module.__dict__)


def _hooked_below(module: nn.Module) -> str | None:
    """Path of a module at or under `module` that carries hooks (they would stop firing), or None."""
    for name, sub in module.named_modules():
        if _hooks(sub):
            return name or "the module itself"
    return None


def _child(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


class _Planner:
    """Decides every block first (so strict mode changes nothing before it raises), then applies.

    `rows`: the report, one (path, what, reason or None) per candidate block. `steps`: what to apply, each a
    callable that changes the model and returns its undo."""

    def __init__(self, model: nn.Module, caller: str):
        self.model = model
        self.caller = caller
        self.rows: list[tuple[str, str, str | None]] = []
        self.steps: list[Callable[[], Callable[[], None]]] = []
        self.blocks: list[tuple[str, str, nn.Module]] = []  # modules whose call-time fallbacks are recorded

    def add(self, path: str, what: str, reason: str | None, apply=None):
        self.rows.append((path, what, reason))
        if reason is None and apply is not None:
            self.steps.append(apply)

    # ------------------------------------------------------------------------------------------ attention
    def plan_attention(self):
        from nitrokernels.nn.attention import NitroAttnProcessor

        chosen: dict[str, nn.Module] = {}
        for path, module in self.model.named_modules():
            if not (hasattr(module, "set_processor") and hasattr(module, "get_processor")):
                continue
            reason = _attention_reason(module, NitroAttnProcessor)
            self.add(path, "attention", reason)
            if reason is None:
                chosen[path] = module
                self.blocks.append((path, "attention", module))
        if chosen:  # one step for all of them: the model's set_attn_processor takes them together
            self.steps.append(lambda: _install_processors(self.model, chosen, NitroAttnProcessor))

    # ---------------------------------------------------------------------------------------------- geglu
    def plan_geglu(self):
        from nitrokernels.nn.geglu import FusedGEGLU

        for path, module in self.model.named_modules():
            if not isinstance(module, GEGLU):
                continue
            reason = None
            if type(module) is not GEGLU:
                reason = f"{type(module).__name__} subclasses GEGLU (its forward may differ)"
            elif (hooked := _hooked_below(module)) is not None:
                reason = f"hooks on {hooked} would be bypassed"
            if reason is not None:
                self.add(path, "geglu", reason)
                continue
            try:
                fused = FusedGEGLU.from_diffusers(module)
            except (ValueError, TypeError, NotImplementedError) as err:
                self.add(path, "geglu", f"FusedGEGLU cannot replace it: {err}")
                continue
            self.add(path, "geglu", None, lambda path=path, fused=fused: _install_geglu(self.model, path, fused))
            self.blocks.append((path, "geglu", fused))

    # ----------------------------------------------------------------------------------------- group norm
    def plan_group_norm(self):
        from nitrokernels.nn.resnet import fuse_resnet_block, resnet_block_unsupported_reason

        for path, module in self.model.named_modules():
            if isinstance(module, ResnetBlock2D):
                reason = resnet_block_unsupported_reason(module)  # hooks on bypassed modules included
                self.add(path, "resnet", reason, None if reason else (lambda m=module: fuse_resnet_block(m)))
                if reason is None:
                    self.blocks.append((path, "resnet", module))
            if type(module).forward in _NORM_ACT_FORWARDS:
                self._plan_norm_act(path, module)

    def _plan_norm_act(self, path: str, owner: nn.Module):
        from nitrokernels.nn.group_norm import GroupNormSiLU

        prefix = f"{path}." if path else ""
        where = f"{prefix}conv_norm_out+conv_act"
        norm, act = getattr(owner, "conv_norm_out", None), getattr(owner, "conv_act", None)
        if norm is None and act is None:
            return  # this config has no output norm (norm_num_groups=None)
        reason = None
        if type(norm) is not nn.GroupNorm:
            reason = f"conv_norm_out is {type(norm).__name__}, not nn.GroupNorm"
        elif type(act) is not nn.SiLU:
            reason = f"conv_act is {type(act).__name__}, not nn.SiLU"
        elif _hooks(norm) or _hooks(act):
            reason = "hooks on conv_norm_out / conv_act would be bypassed"
        if reason is not None:
            self.add(where, "group_norm_silu", reason)
            return

        # shares the GroupNorm's Parameters: the same state-dict keys, gradients land on the originals
        fused = GroupNormSiLU.from_group_norm(norm)
        object.__setattr__(fused, "_nk_original", (norm, act))  # unregistered: for revert / unpatch of copies
        self.add(where, "group_norm_silu", None, lambda: _install_norm_act(owner, fused))
        self.blocks.append((where, "group_norm_silu", fused))

    # ---------------------------------------------------------------------------------------------- run
    def run(self, strict: bool) -> PatchHandle:
        unsupported = [(path, what, reason) for path, what, reason in self.rows if reason is not None]
        if strict and unsupported:
            lines = "\n".join(f"  {what} {path or '<root>'}: {reason}" for path, what, reason in unsupported)
            raise UnsupportedBlockError(f"{self.caller}(strict=True): {len(unsupported)} block(s) cannot be patched "
                                        f"(nothing was changed):\n{lines}")
        handle = PatchHandle(self.model)
        try:
            for apply in self.steps:
                handle._undo.append(apply())
        except BaseException:
            handle.revert()
            raise
        handle.report = [(path, what, reason or PATCHED) for path, what, reason in self.rows]
        handle._blocks = list(self.blocks)
        for module in self.model.modules():
            _LIVE[module] = handle
        for path, what, reason in unsupported:
            log.info("%s: skipped %s %s: %s", self.caller, what, path or "<root>", reason)
        if unsupported:
            log.warning("%s: patched %d block(s), skipped %d (see handle.report / handle.summary())",
                        self.caller, len(handle.patched), len(unsupported))
        return handle


def _attention_reason(attn: nn.Module, processor_cls) -> str | None:
    if not isinstance(attn, Attention):
        return f"{type(attn).__name__} is not diffusers' Attention"
    reason = processor_cls.unsupported_reason(attn)  # module structure the processor cannot reproduce
    if reason:
        return reason
    processor = attn.get_processor()
    if not any(type(processor) is stock for stock in _STOCK_PROCESSORS):  # identity: ours compares equal
        return (f"processor {type(processor).__name__} is not AttnProcessor2_0 / AttnProcessor "
                f"(custom processors are kept)")
    if getattr(attn, "fused_projections", False):
        return "QKV projections are fused (fuse_qkv_projections)"
    if type(processor) is AttnProcessor2_0 and attn.scale != (attn.inner_dim // attn.heads) ** -0.5:
        # AttnProcessor2_0 always uses SDPA's default 1/sqrt(head_dim); NitroAttnProcessor uses attn.scale.
        return f"AttnProcessor2_0 ignores attn.scale={attn.scale:g} (scale_qk=False); kept for equivalence"
    return None


def _install_processors(model: nn.Module, chosen: dict[str, nn.Module], processor_cls) -> Callable[[], None]:
    """Give each chosen Attention module a NitroAttnProcessor; returns the undo, which puts the original back
    only where the processor is still this one (a processor the user installed since is kept)."""
    # no fused-QKV cache: peft's fuse_lora / unload write merged weights through `.data`, which no cheap check
    # sees (see nitrokernels.nn.attention); the per-call concatenation always reads the current weights
    processor = processor_cls(cache_fused_qkv=False)  # one instance serves every module
    for module in chosen.values():
        # kept on the module (not registered: processors are plain objects) so that copies can be unpatched
        object.__setattr__(module, "_nk_original_processor", module.get_processor())
    if hasattr(model, "set_attn_processor") and hasattr(model, "attn_processors"):
        current = model.attn_processors
        keys = {f"{path}.processor" for path in chosen}
        if not keys - set(current):
            new = dict(current)
            for key in keys:
                new[key] = processor
            model.set_attn_processor(new)
        else:  # unexpected naming: per module
            for module in chosen.values():
                module.set_processor(processor)
    else:  # no set_attn_processor on this model: per module
        for module in chosen.values():
            module.set_processor(processor)

    def undo():
        for module in chosen.values():
            _restore_processor(module, only=processor)

    return undo


def _restore_processor(attn: nn.Module, only=None) -> bool:
    """Put back the processor NitroAttnProcessor replaced on `attn`, if the current one is ours (`only`, or any
    NitroAttnProcessor); a processor installed later by the user is kept. True when something was restored."""
    from nitrokernels.nn.attention import NitroAttnProcessor

    original = attn.__dict__.pop("_nk_original_processor", None)
    current = attn.get_processor() if hasattr(attn, "get_processor") else getattr(attn, "processor", None)
    ours = current is only if only is not None else type(current) is NitroAttnProcessor
    if not ours:
        return False
    attn.set_processor(original if original is not None else AttnProcessor2_0())
    return True


def _install_geglu(model: nn.Module, path: str, fused: nn.Module) -> Callable[[], None]:
    parent, name = _child(model, path)
    setattr(parent, name, fused)
    return lambda: _restore_geglu(parent, name, fused)


def _restore_geglu(parent: nn.Module, name: str, fused: nn.Module) -> bool:
    """Put the original GEGLU back in place of `fused` (if `fused` is still there), with fused's current `proj`
    (the same Linear, or whatever wrapped it since: a LoRA layer stays)."""
    original = fused.__dict__.get("_nk_original")
    if original is None or getattr(parent, name, None) is not fused:
        return False
    if original.proj is not fused.proj:
        original.proj = fused.proj
    original.train(fused.training)
    setattr(parent, name, original)
    return True


def _install_norm_act(owner: nn.Module, fused: nn.Module) -> Callable[[], None]:
    setattr(owner, "conv_norm_out", fused)
    setattr(owner, "conv_act", nn.Identity())
    return lambda: _restore_norm_act(owner, fused)


def _restore_norm_act(owner: nn.Module, fused: nn.Module) -> bool:
    """Put the original GroupNorm + SiLU back in place of `fused` (+ its Identity), carrying over the parameters
    fused holds now (load_state_dict(assign=True) gives it new tensors)."""
    original = fused.__dict__.get("_nk_original")
    if original is None or getattr(owner, "conv_norm_out", None) is not fused:
        return False
    norm, act = original
    for name in ("weight", "bias"):
        if norm._parameters.get(name) is not fused._parameters.get(name):
            norm._parameters[name] = fused._parameters.get(name)
    norm.train(fused.training)
    owner.conv_norm_out = norm
    if type(getattr(owner, "conv_act", None)) is nn.Identity:
        owner.conv_act = act
    return True


def unpatch(model: nn.Module) -> int:
    """Take nitrokernels' fused blocks out of `model` -- also a deepcopy or an unpickled copy of a patched
    model, which no handle knows about. A model with a live handle is reverted through it. Returns the number of
    blocks restored. Processors the user installed after patching are kept."""
    from nitrokernels.nn.attention import NitroAttnProcessor
    from nitrokernels.nn.geglu import FusedGEGLU
    from nitrokernels.nn.group_norm import GroupNormSiLU
    from nitrokernels.nn.resnet import _is_fused

    model = getattr(model, "_orig_mod", model)
    handle = _LIVE.get(model)
    if handle is not None and not handle.reverted and handle.model is model:
        n = len(handle.patched)
        handle.revert()
        return n
    restored = 0
    for path, module in list(model.named_modules()):
        parent, name = _child(model, path) if path else (None, "")
        if isinstance(module, FusedGEGLU) and parent is not None:
            restored += _restore_geglu(parent, name, module)
        elif isinstance(module, GroupNormSiLU) and parent is not None and name == "conv_norm_out":
            restored += _restore_norm_act(parent, module)
        if _is_fused(module):
            del module.__dict__["forward"]
            restored += 1
        processor = module.__dict__.get("processor")
        if type(processor) is NitroAttnProcessor or "_nk_original_processor" in module.__dict__:
            restored += _restore_processor(module)
    return restored


def _carries_fused_blocks(model: nn.Module) -> str | None:
    from nitrokernels.nn.attention import NitroAttnProcessor
    from nitrokernels.nn.geglu import FusedGEGLU
    from nitrokernels.nn.group_norm import GroupNormSiLU
    from nitrokernels.nn.resnet import _is_fused

    for path, module in model.named_modules():
        if (isinstance(module, FusedGEGLU) or isinstance(module, GroupNormSiLU)) and "_nk_original" in module.__dict__ \
                or _is_fused(module) or type(module.__dict__.get("processor")) is NitroAttnProcessor:
            return path or "the model itself"
    return None


def _refuse_if_patched(model: nn.Module, caller: str):
    for path, module in model.named_modules():
        handle = _LIVE.get(module)
        if handle is not None and not handle.reverted:
            where = "the model" if module is model else f"its submodule {path}"
            raise AlreadyPatchedError(f"{caller}: {where} is already patched by nitrokernels (patch of "
                                      f"{type(handle.model).__name__}); call handle.revert() before patching again")
    where = _carries_fused_blocks(model)
    if where is not None:
        raise AlreadyPatchedError(f"{caller}: {where} carries nitrokernels' fused blocks but no live patch owns it "
                                  f"(a deepcopy / unpickled copy of a patched model?); call "
                                  f"nitrokernels.patch.unpatch(model) first")


def _patch(model: nn.Module, caller: str, *, attention: bool, group_norm: bool, geglu: bool,
           strict: bool) -> PatchHandle:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: expected a diffusers model (nn.Module), got {type(model).__name__}")
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: patch the module it compiles
    _refuse_if_patched(model, caller)
    planner = _Planner(model, caller)
    if attention:
        planner.plan_attention()
    if geglu:
        planner.plan_geglu()
    if group_norm:
        planner.plan_group_norm()
    return planner.run(strict)


# the flags' order before they became keyword-only (patch_unet and patch_vae had different orders)
_LEGACY_ORDER = {"patch_unet": ("attention", "group_norm", "geglu", "strict"),
                 "patch_vae": ("group_norm", "attention", "strict")}
_DEFAULTS = {"attention": True, "group_norm": True, "geglu": True, "strict": False}


def _legacy_flags(caller: str, legacy: tuple, flags: dict) -> dict:
    """`flags` with the positional flags of the old signature applied (DeprecationWarning naming the keywords)."""
    if not legacy:
        return flags
    order = _LEGACY_ORDER[caller]
    if len(legacy) > len(order):
        raise TypeError(f"{caller}() takes the model and keyword-only flags ({', '.join(order)}); got "
                        f"{len(legacy)} flags by position")
    given = dict(zip(order, legacy))
    clash = [name for name, value in given.items() if flags[name] != _DEFAULTS[name] and flags[name] != value]
    if clash:
        raise TypeError(f"{caller}() got {', '.join(clash)} both by position and by keyword")
    keywords = ", ".join(f"{name}={value!r}" for name, value in given.items())
    import warnings

    warnings.warn(f"{caller}: flags by position are deprecated (the order differed between patch_unet and "
                  f"patch_vae); pass them by keyword: {caller}(model, {keywords})", DeprecationWarning, stacklevel=3)
    return {**flags, **given}


def patch_unet(unet: nn.Module, *legacy: bool, attention: bool = True, group_norm: bool = True, geglu: bool = True,
               strict: bool = False) -> PatchHandle:
    """Patch a loaded diffusers UNet (SD1.5 / SD2 / SDXL UNet2DConditionModel, or any model built from the
    same blocks) in place with nitrokernels' fused blocks; see this module's docstring. The flags are keywords
    (`attention`, `group_norm`, `geglu`: which blocks to fuse; `strict`: raise on unsupported blocks); flags by
    position still work in the old order (attention, group_norm, geglu, strict) with a DeprecationWarning."""
    flags = _legacy_flags("patch_unet", legacy, dict(attention=attention, group_norm=group_norm, geglu=geglu,
                                                     strict=strict))
    return _patch(unet, "patch_unet", **flags)


def patch_vae(vae: nn.Module, *legacy: bool, attention: bool = True, group_norm: bool = True,
              strict: bool = False) -> PatchHandle:
    """Patch a loaded diffusers VAE (AutoencoderKL: encoder and decoder ResnetBlock2Ds, mid-block attention,
    output GroupNorm+SiLU) in place; see this module's docstring. The flags are keywords, as patch_unet's; flags
    by position still work in the old order (group_norm, attention, strict) with a DeprecationWarning."""
    flags = _legacy_flags("patch_vae", legacy, dict(attention=attention, group_norm=group_norm, strict=strict))
    return _patch(vae, "patch_vae", geglu=False, **flags)
