"""FusedGEGLU: drop-in for diffusers.models.activations.GEGLU running nitrokernels.ops.geglu.

Same constructor (dim_in, dim_out, bias=True), same single parameter-holding child `proj` (an nn.Linear of
dim_in -> 2 * dim_out), hence the same state_dict keys ("proj.weight", "proj.bias"). `from_diffusers(module)`
wraps an existing GEGLU *sharing* its `proj` (no copy), so optimisers, LoRA-free checkpoints and revert keep
working on the very same Parameters.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from nitrokernels.nn import _calltime
from nitrokernels.ops.geglu import geglu


class FusedGEGLU(nn.Module):
    """hidden * gelu(gate) with (hidden, gate) = proj(x).chunk(2, -1): diffusers' GEGLU with the projection and
    the gate fused (nitrokernels.ops.geglu). Same constructor and state-dict keys as diffusers' GEGLU; see the
    module docstring. A `proj` wrapped, hooked or offloaded after fusing is called through for that call."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_diffusers(cls, module: nn.Module) -> "FusedGEGLU":
        """A FusedGEGLU that shares `module.proj` (a diffusers GEGLU, or anything with a plain nn.Linear proj
        and GEGLU's math). Raises TypeError / ValueError with the reason when it cannot stand in for it."""
        proj = getattr(module, "proj", None)
        if type(proj) is not nn.Linear:
            raise TypeError(f"FusedGEGLU.from_diffusers: expected a module whose `proj` is an nn.Linear, got "
                            f"{type(proj).__name__ if proj is not None else 'no proj'} on {type(module).__name__}")
        if proj.out_features % 2:
            raise ValueError(f"FusedGEGLU.from_diffusers: proj has {proj.out_features} outputs; GEGLU needs an "
                             "even number")
        if proj._forward_hooks or proj._forward_pre_hooks or "forward" in proj.__dict__:
            raise ValueError("FusedGEGLU.from_diffusers: proj has hooks or a replaced forward that the fused "
                             "kernel would bypass")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.proj = proj
        fused.train(module.training)
        # the module it stands in for, unregistered (not a child: no state-dict keys, not moved by .to()); it
        # travels with deepcopy / pickle so `nitrokernels.patch.unpatch` can put it back on any copy
        object.__setattr__(fused, "_nk_original", module)
        return fused

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            warnings.warn("FusedGEGLU: the `scale` argument is deprecated in diffusers and ignored",
                          FutureWarning, stacklevel=2)
        proj = self.proj
        reason = _calltime.linear_bypass_reason(proj, hidden_states, "proj")
        if reason is not None:
            # proj was wrapped or hooked after fusing (a LoRA layer, an offload or casting hook), or its weights
            # are offloaded / stored in another dtype: the fused op would read proj.weight directly and skip
            # all that -- run diffusers' GEGLU math through the module for this call
            _calltime.record(self, "geglu", reason)
            hidden, gate = proj(hidden_states).chunk(2, dim=-1)
            return hidden * F.gelu(gate)
        return geglu(hidden_states, proj.weight, proj.bias)

    def extra_repr(self) -> str:
        return f"dim_in={self.proj.in_features}, dim_out={self.proj.out_features // 2}, bias={self.proj.bias is not None}"
