"""Build script: the pure-Python + Triton package always, the CUDA extension `nitrokernels._C` when it can.

The extension is built when torch is importable *in the build environment* with CUDA support and nvcc is
found (use `pip install --no-build-isolation .` so the build sees your installed torch). Switches:

  NITROKERNELS_BUILD_EXT=auto|1|0   auto (default) builds when possible; 1 fails loudly if it cannot; 0 skips
  TORCH_CUDA_ARCH_LIST="8.0;9.0a"  architectures to build (default: sm_80 and sm_90a)
  MAX_JOBS=N                       parallel compile jobs (honoured by torch's ninja build)

Whatever happens is recorded in `nitrokernels/_build_info.json`, which the package reads at import to
report a missing or mismatched extension clearly (`nitrokernels info`).
"""
import glob
import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "nitrokernels", "_build_info.json")
DEFAULT_ARCHS = "8.0;9.0a"


def _say(msg):
    # pip hides setup output unless -v; stderr lines still land in the build log, and the same text is
    # recorded in _build_info.json for `nitrokernels info`.
    print(f"[nitrokernels] {msg}", file=sys.stderr)


def _extension_plan():
    """Return (extension or None, build-info dict)."""
    mode = os.environ.get("NITROKERNELS_BUILD_EXT", "auto").lower()
    info = {"requested": mode, "built": False}
    if mode in ("0", "no", "false", "off"):
        info["reason"] = "skipped: NITROKERNELS_BUILD_EXT=0"
        return None, info
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError as err:
        info["reason"] = f"torch not importable in the build environment ({err}); use --no-build-isolation"
        return None, info
    info["torch"] = torch.__version__
    if torch.version.cuda is None:
        info["reason"] = f"torch {torch.__version__} is a CPU-only build"
        return None, info
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        info["reason"] = "nvcc not found (set CUDA_HOME)"
        return None, info
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
    if not sources:    # e.g. an sdist made without MANIFEST.in: the pure package, with the reason
        info["reason"] = "no CUDA sources under csrc/ in this source tree"
        return None, info
    ext = CUDAExtension(
        name="nitrokernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    info.update(built=True, torch_cuda=torch.version.cuda, archs=archs, sources=sources)
    return ext, info


def _write_build_info(info):
    with open(BUILD_INFO, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)


def main():
    ext, info = _extension_plan()
    if ext is None and info["requested"] in ("1", "yes", "true", "on", "force"):
        raise SystemExit(f"[nitrokernels] NITROKERNELS_BUILD_EXT=1 but the CUDA extension cannot be built: {info['reason']}")
    if ext is None:
        _say(f"installing the pure-Python + Triton package without the CUDA extension: {info['reason']}")
    else:
        _say(f"building the CUDA extension for archs {info['archs']} with CUDA {info['torch_cuda']}")
    _write_build_info(info)
    kwargs = {}
    if ext is not None:
        from torch.utils.cpp_extension import BuildExtension

        kwargs = {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}
    setup(**kwargs)


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it
    main()
