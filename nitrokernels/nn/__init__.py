"""Drop-in nn.Modules built on nitrokernels.ops (same constructor signatures as torch / diffusers)."""
from nitrokernels.nn.attention import NitroAttnProcessor  # noqa: F401
from nitrokernels.nn.geglu import FusedGEGLU  # noqa: F401
from nitrokernels.nn.group_norm import GroupNormSiLU  # noqa: F401
from nitrokernels.nn.head_pool import SDXL_LEVELS, HeadPool, HeadSample  # noqa: F401

__all__ = ["FusedGEGLU", "GroupNormSiLU", "HeadPool", "HeadSample", "NitroAttnProcessor", "SDXL_LEVELS"]
