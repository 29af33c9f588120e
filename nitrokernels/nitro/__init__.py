"""NitroFusion: dynamic discriminator, adversarial distillation trainer, timestep-shift LCM scheduler, pipeline.

Names are imported lazily so `import nitrokernels` does not pull in diffusers.
"""
import importlib

_LAZY = {
    "DynamicDiscriminator": "nitrokernels.nitro.discriminator",
    "NitroDistiller": "nitrokernels.nitro.distiller",
    "DistillConfig": "nitrokernels.nitro.distiller",
    "TimestepShiftLCMScheduler": "nitrokernels.nitro.scheduler",
    "load_pipeline": "nitrokernels.nitro.pipeline",
    "sample": "nitrokernels.nitro.sampling",
}
# old names that still resolve (with a DeprecationWarning when called) but are not part of the API
_DEPRECATED = {"sample_one_to_four": "nitrokernels.nitro.sampling"}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY or name in _DEPRECATED:
        return getattr(importlib.import_module(_LAZY.get(name) or _DEPRECATED[name]), name)
    raise AttributeError(f"module 'nitrokernels.nitro' has no attribute {name!r}")
