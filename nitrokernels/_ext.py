"""The optional CUDA extension `nitrokernels._C`: load it once, or say once why it is not used.

Kernels in the extension register themselves as `torch.ops.nitrokernels_cuda.*` (TORCH_LIBRARY_FRAGMENT in
each csrc/ family), so callers only need `extension_available()` and `torch.ops.nitrokernels_cuda`.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import warnings

import torch

log = logging.getLogger("nitrokernels")
_BUILD_INFO_PATH = os.path.join(os.path.dirname(__file__), "_build_info.json")


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What setup.py recorded about the extension build (or an explanation when nothing was recorded)."""
    try:
        with open(_BUILD_INFO_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"built": False, "reason": "no build record (running from a source tree that was never installed?)"}


def _mismatch(info: dict) -> str | None:
    """Why a built extension does not match the running torch, or None."""
    built_torch = info.get("torch")
    if built_torch and built_torch.split("+")[0] != torch.__version__.split("+")[0]:
        return f"built against torch {built_torch}, running torch {torch.__version__}; reinstall nitrokernels"
    built_cuda = info.get("torch_cuda")
    if built_cuda and torch.version.cuda and built_cuda.split(".")[0] != torch.version.cuda.split(".")[0]:
        return f"built for CUDA {built_cuda}, running torch with CUDA {torch.version.cuda}; reinstall nitrokernels"
    return None


@functools.lru_cache(maxsize=None)
def _load() -> tuple[object | None, str]:
    info = build_info()
    if os.environ.get("NITROKERNELS_DISABLE_EXT", "0") not in ("", "0"):
        return None, "disabled by NITROKERNELS_DISABLE_EXT"
    if not info.get("built"):
        return None, f"not built: {info.get('reason', 'unknown')}"
    problem = _mismatch(info)
    if problem:
        warnings.warn(f"nitrokernels._C is not used: {problem}", RuntimeWarning, stacklevel=3)
        return None, problem
    try:
        from nitrokernels import _C  # noqa: F401  (registers torch.ops.nitrokernels_cuda.*)
    except ImportError as err:
        msg = f"import failed: {err}"
        warnings.warn(f"nitrokernels._C is not used ({msg}); the Triton and eager backends still work",
                      RuntimeWarning, stacklevel=3)
        return None, msg
    return _C, "loaded"


def extension() -> object | None:
    """The loaded `_C` module, or None."""
    return _load()[0]


def extension_status() -> str:
    """'loaded' or the reason the extension is not in use."""
    return _load()[1]


def extension_available() -> bool:
    return _load()[0] is not None


def compiled_archs() -> list[str]:
    """Architectures the installed extension was built for (empty when not built)."""
    archs = build_info().get("archs") or ""
    return [a for a in archs.replace(",", ";").split(";") if a] if build_info().get("built") else []
