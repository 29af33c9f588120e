"""The functional API: torch.library custom ops with backend dispatch (CUDA extension -> Triton -> eager).

Each op module registers its `DispatchedOp`s in `dispatch.REGISTRY` on import; `nitrokernels info` lists them.
"""
from nitrokernels.ops.dispatch import BACKENDS, REGISTRY, BackendUnavailable, use_backend  # noqa: F401
from nitrokernels.ops.optim import sampled_adamw_  # noqa: F401
from nitrokernels.ops.group_norm import group_norm_silu  # noqa: F401
from nitrokernels.ops.attention import attention, attention_fallbacks, reset_attention_fallbacks  # noqa: F401
from nitrokernels.ops.geglu import geglu  # noqa: F401
from nitrokernels.ops.layer_norm import layer_norm  # noqa: F401
from nitrokernels.ops.heads import head_levels, head_stack  # noqa: F401,E402
