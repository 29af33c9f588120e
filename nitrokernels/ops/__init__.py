"""The functional API: torch.library custom ops with backend dispatch (CUDA extension -> Triton -> eager).

Each op module registers its `DispatchedOp`s in `dispatch.REGISTRY` on import; `nitrokernels info` lists them.
"""
from nitrokernels.ops.dispatch import BACKENDS, REGISTRY, BackendUnavailable, use_backend  # noqa: F401
from nitrokernels.ops.optim import sampled_adamw_  # noqa: F401
from nitrokernels.ops.group_norm import group_norm_silu  # noqa: F401
from nitrokernels.ops.attention import attention, attention_fallbacks, reset_attention_fallbacks  # noqa: F401
from nitrokernels.ops.geglu import geglu  # noqa: F401
from nitrokernels.ops.heads import head_levels, head_stack  # noqa: F401,E402

__all__ = ["BACKENDS", "REGISTRY", "BackendUnavailable", "attention", "attention_fallbacks", "geglu",
           "group_norm_silu", "head_levels", "head_stack", "reset_attention_fallbacks", "sampled_adamw_",
           "use_backend"]


def __getattr__(name: str):
    if name == "layer_norm":  # removed: it only called torch's kernel under another name
        import warnings

        import torch.nn.functional as F

        warnings.warn("nitrokernels.ops.layer_norm is deprecated and will be removed: it was "
                      "torch.nn.functional.layer_norm under another name (no fused backend); call that instead",
                      DeprecationWarning, stacklevel=2)
        return F.layer_norm
    raise AttributeError(f"module 'nitrokernels.ops' has no attribute {name!r}")
