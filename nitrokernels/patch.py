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

__all__ = ["AlreadyPatchedError", "PatchHandle", "UnsupportedBlockError", "patch_unet", "patch_vae"]

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
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _hooked_below(module: nn.Module) -> str | None:
    """Path of a module at or under `module` that carries hooks (they would stop firing), or None."""
    for name, sub in module.named_modules():
        if _hooks(sub):
            return name or "the module itself"
    return None


def _child(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def _replace(model: nn.Module, path: str, new: nn.Module) -> Callable[[], None]:
    """Put `new` at `path` in place of the current module; returns the undo."""
    parent, name = _child(model, path)
    old = getattr(parent, name)
    setattr(parent, name, new)
    return lambda: setattr(parent, name, old)


class _Planner:
    """Decides every block first (so strict mode changes nothing before it raises), then applies.

    `rows`: the report, one (path, what, reason or None) per candidate block. `steps`: what to apply, each a
    callable that changes the model and returns its undo."""

    def __init__(self, model: nn.Module, caller: str):
        self.model = model
        self.caller = caller
        self.rows: list[tuple[str, str, str | None]] = []
        self.steps: list[Callable[[], Callable[[], None]]] = []

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
            self.add(path, "geglu", None, lambda path=path, fused=fused: _replace(self.model, path, fused))

    # ----------------------------------------------------------------------------------------- group norm
    def plan_group_norm(self):
        from nitrokernels.nn.resnet import fuse_resnet_block, resnet_block_unsupported_reason

        for path, module in self.model.named_modules():
            if isinstance(module, ResnetBlock2D):
                reason = resnet_block_unsupported_reason(module)  # hooks on bypassed modules included
                self.add(path, "resnet", reason, None if reason else (lambda m=module: fuse_resnet_block(m)))
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

        def apply(norm=norm, prefix=prefix):
            # shares the GroupNorm's Parameters: the same state-dict keys, gradients land on the originals
            undo_norm = _replace(self.model, f"{prefix}conv_norm_out", GroupNormSiLU.from_group_norm(norm))
            undo_act = _replace(self.model, f"{prefix}conv_act", nn.Identity())
            return lambda: (undo_act(), undo_norm())

        self.add(where, "group_norm_silu", None, apply)

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
    if type(processor) not in _STOCK_PROCESSORS:
        return (f"processor {type(processor).__name__} is not AttnProcessor2_0 / AttnProcessor "
                f"(custom processors are kept)")
    if getattr(attn, "fused_projections", False):
        return "QKV projections are fused (fuse_qkv_projections)"
    if type(processor) is AttnProcessor2_0 and attn.scale != (attn.inner_dim // attn.heads) ** -0.5:
        # AttnProcessor2_0 always uses SDPA's default 1/sqrt(head_dim); NitroAttnProcessor uses attn.scale.
        return f"AttnProcessor2_0 ignores attn.scale={attn.scale:g} (scale_qk=False); kept for equivalence"
    return None


def _install_processors(model: nn.Module, chosen: dict[str, nn.Module], processor_cls) -> Callable[[], None]:
    """Give each chosen Attention module a NitroAttnProcessor; returns the undo (originals put back)."""
    originals = {path: module.get_processor() for path, module in chosen.items()}
    processor = processor_cls()  # one instance serves every module (its state is keyed per module)
    if hasattr(model, "set_attn_processor") and hasattr(model, "attn_processors"):
        current = model.attn_processors
        keys = {f"{path}.processor": path for path in chosen}
        missing = set(keys) - set(current)
        if not missing:
            new = dict(current)
            for key in keys:
                new[key] = processor
            model.set_attn_processor(new)

            def undo():
                restore = dict(model.attn_processors)
                for key, path in keys.items():
                    restore[key] = originals[path]
                model.set_attn_processor(restore)

            return undo
    for module in chosen.values():  # no set_attn_processor on this model (or unexpected naming): per module
        module.set_processor(processor)

    def undo_each():
        for path, module in chosen.items():
            module.set_processor(originals[path])

    return undo_each


def _refuse_if_patched(model: nn.Module, caller: str):
    for path, module in model.named_modules():
        handle = _LIVE.get(module)
        if handle is not None and not handle.reverted:
            where = "the model" if module is model else f"its submodule {path}"
            raise AlreadyPatchedError(f"{caller}: {where} is already patched by nitrokernels (patch of "
                                      f"{type(handle.model).__name__}); call handle.revert() before patching again")


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


def patch_unet(unet: nn.Module, attention: bool = True, group_norm: bool = True, geglu: bool = True,
               strict: bool = False) -> PatchHandle:
    """Patch a loaded diffusers UNet (SD1.5 / SD2 / SDXL UNet2DConditionModel, or any model built from the
    same blocks) in place with nitrokernels' fused blocks; see this module's docstring."""
    return _patch(unet, "patch_unet", attention=attention, group_norm=group_norm, geglu=geglu, strict=strict)


def patch_vae(vae: nn.Module, group_norm: bool = True, attention: bool = True, strict: bool = False) -> PatchHandle:
    """Patch a loaded diffusers VAE (AutoencoderKL: encoder and decoder ResnetBlock2Ds, mid-block attention,
    output GroupNorm+SiLU) in place; see this module's docstring."""
    return _patch(vae, "patch_vae", attention=attention, group_norm=group_norm, geglu=False, strict=strict)
