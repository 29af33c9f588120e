"""Compile-check the CUDA C++ sources without building the extension: `python -m nitrokernels.build_check [files]`.

CI machines have nvcc but no GPU and a CPU build of torch. This compiles each csrc/**/*.cu to an object file
for sm_90a with the installed torch's headers, which proves the kernels compile. A CPU torch wheel lacks one
CMake-generated CUDA header (c10/cuda/impl/cuda_cmake_macros.h); a one-line shim stands in for it.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHIM = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(cuda_home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


def cuda_sources(root: str = REPO) -> list[str]:
    """Every source of the extension: csrc/**/*.cu and the C++ bindings (nvcc hands .cpp to the host compiler)."""
    patterns = ("*.cu", "*.cpp")
    return sorted(f for p in patterns for f in glob.glob(os.path.join(root, "csrc", "**", p), recursive=True))


def _include_flags(shim_dir: str) -> list[str]:
    import torch

    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    dirs = [shim_dir, os.path.join(REPO, "csrc"), torch_include,
            os.path.join(torch_include, "torch", "csrc", "api", "include"), sysconfig.get_paths()["include"]]
    return [f"-I{d}" for d in dirs]


def compile_source(path: str, nvcc: str, flags: list[str], out_dir: str, arch: str = "sm_90a") -> tuple[str, int, str]:
    """Compile one file to an object; returns (path, return code, compiler output)."""
    obj = os.path.join(out_dir, os.path.basename(path) + ".o")
    cmd = [nvcc, "-c", path, "-o", obj, "-std=c++20", f"-arch={arch}", "-O2", "--expt-relaxed-constexpr",
           "-DTORCH_EXTENSION_NAME=_C", "-w", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return path, proc.returncode, proc.stdout + proc.stderr


def check(paths: list[str], arch: str = "sm_90a", jobs: int = 2) -> list[tuple[str, int, str]]:
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found: set CUDA_HOME or put nvcc on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        shim = os.path.join(tmp, "shim", "c10", "cuda", "impl")
        os.makedirs(shim)
        with open(os.path.join(shim, "cuda_cmake_macros.h"), "w") as f:
            f.write(_SHIM)
        flags = _include_flags(os.path.join(tmp, "shim"))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(lambda p: compile_source(p, nvcc, flags, tmp, arch), paths))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nitrokernels.build_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="sources to compile (default: every csrc/**/*.cu)")
    parser.add_argument("--arch", default="sm_90a", help="GPU architecture to compile for (default sm_90a)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes")
    args = parser.parse_args(argv)
    failed = 0
    for path, code, output in check(args.files or cuda_sources(), args.arch, args.jobs):
        print(f"{'ok  ' if code == 0 else 'FAIL'} {os.path.relpath(path, REPO)}")
        if code:
            failed += 1
            print(output[-4000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
