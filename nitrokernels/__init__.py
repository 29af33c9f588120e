"""nitrokernels: Triton and CUDA kernels for NitroFusion-style one-step diffusion, training and inference.

    import nitrokernels as nk
    nk.ops.group_norm_silu(x, 32, w, b, temb=temb)         # fused ops (nitrokernels.ops)
    handle = nk.patch_unet(unet); ...; handle.revert()     # fused blocks in a diffusers UNet
    with nk.use_backend("eager"): ...                      # force a backend (also NITROKERNELS_BACKEND)

Heavier pieces (diffusers integration, the NitroFusion API) are imported lazily on first use.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "use_backend": "nitrokernels.ops.dispatch",
    "BackendUnavailable": "nitrokernels.ops.dispatch",
    "patch_unet": "nitrokernels.patch",
    "patch_vae": "nitrokernels.patch",
    "graphed": "nitrokernels.graph",
    "info": "nitrokernels.info",
}
_SUBMODULES = ("ops", "nn", "nitro", "kernels", "optim", "testing")
__all__ = sorted(_LAZY) + list(_SUBMODULES)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"nitrokernels.{name}")
    raise AttributeError(f"module 'nitrokernels' has no attribute {name!r}")
