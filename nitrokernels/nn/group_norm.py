"""GroupNormSiLU: nn.GroupNorm (same constructor, same parameters and state-dict keys) followed by SiLU, fused.

    norm = GroupNormSiLU(32, 320, eps=1e-6)          # == nn.Sequential(nn.GroupNorm(32, 320, eps=1e-6), nn.SiLU())
    norm.load_state_dict(group_norm.state_dict())   # weights load across in both directions
    y = norm(x, temb)                               # optional temb [N, C] added before normalising
    GroupNormSiLU.from_group_norm(gn)               # shares gn's Parameters (for patching a loaded model)

`act=None` gives a plain GroupNorm (with the optional temb add) on the same kernels.
"""
from __future__ import annotations

import torch
from torch import nn

from nitrokernels.nn import _calltime
from nitrokernels.ops.group_norm import group_norm_silu

__all__ = ["GroupNormSiLU"]


def _check_eps(owner: str, eps) -> None:
    import math

    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{owner}: eps must be a finite number >= 0, got {eps!r}")


_NORM_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def norm_bypass_reason(norm: nn.Module, x: torch.Tensor, name: str) -> str | None:
    """Why group_norm_silu cannot read `norm`'s weight / bias for input `x` (meta / other device / a storage dtype
    the kernels do not take), or None. Parameters may be x's dtype or float32 (mixed precision)."""
    if x.dtype not in _NORM_X_DTYPES:
        return f"input dtype {x.dtype}"
    for t in (norm.weight, norm.bias):
        if t is None:
            continue
        if type(t) not in (torch.Tensor, nn.Parameter):
            return f"{name} holds a {type(t).__name__} (tensor subclass)"
        if t.device.type == "meta":
            return f"{name} has parameters on the meta device (offloaded)"
        if t.device != x.device:
            return f"{name} has parameters on {t.device}, the input is on {x.device}"
        if t.dtype not in (x.dtype, torch.float32):
            return f"{name} stores {t.dtype}, the input is {x.dtype}"
    return None


class GroupNormSiLU(nn.Module):
    """act(GroupNorm(x + temb)) with torch.nn.GroupNorm's signature plus `act` ("silu" or None)."""

    __constants__ = ["num_groups", "num_channels", "eps", "affine", "act"]

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: str | None = "silu", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        for name, value in (("num_groups", num_groups), ("num_channels", num_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GroupNormSiLU: {name} must be a positive int, got {value!r}")
        _check_eps("GroupNormSiLU", eps)
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNormSiLU: num_channels={num_channels} is not divisible by num_groups={num_groups}")
        if act not in ("silu", "swish", None):
            raise ValueError(f"GroupNormSiLU: act must be 'silu' or None, got {act!r}")
        self.num_groups, self.num_channels, self.eps, self.affine, self.act = num_groups, num_channels, eps, affine, act
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight = 1, bias = 0 (as torch.nn.GroupNorm); nothing without affine."""
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, act: str | None = "silu") -> "GroupNormSiLU":
        """A GroupNormSiLU that shares `norm`'s Parameters (no copy; the same state-dict keys)."""
        if not isinstance(norm, nn.GroupNorm):
            raise TypeError(f"GroupNormSiLU.from_group_norm: expected an nn.GroupNorm, got {type(norm).__name__}")
        fused = cls(norm.num_groups, norm.num_channels, eps=norm.eps, affine=False, act=act)
        fused.affine = norm.affine
        fused.weight, fused.bias = norm.weight, norm.bias
        fused.train(norm.training)
        return fused

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        reason = norm_bypass_reason(self, x, "the GroupNorm")
        if reason is not None:  # offloaded / other storage dtype: torch's own computation for this call
            _calltime.record(self, "group_norm_silu", reason)
            if temb is not None:
                x = x + temb.reshape(temb.shape[0], temb.shape[1], *([1] * (x.dim() - 2)))
            y = torch.nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            return torch.nn.functional.silu(y) if self.act is not None else y
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, temb=temb, act=self.act)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, act={self.act!r}"
