"""What this installation can do: versions, GPU, the CUDA extension, Triton, and per op which backend runs.

`nitrokernels info` / `python -m nitrokernels info` print `format_info(collect())`.
"""
from __future__ import annotations

import importlib
import platform
import sys
import types

import torch

from nitrokernels import __version__, _ext
from nitrokernels.ops import dispatch

# Op modules are optional at import (a broken one must not hide the others): each is imported here and a
# failure is reported as such.
OP_MODULES = ("group_norm", "heads", "optim", "attention", "geglu")


def import_op_modules() -> dict[str, str]:
    """Import every op module so its ops register; returns {module: "ok" | error}."""
    status = {}
    for name in OP_MODULES:
        try:
            importlib.import_module(f"nitrokernels.ops.{name}")
            status[name] = "ok"
        except ModuleNotFoundError as err:
            status[name] = "absent" if err.name == f"nitrokernels.ops.{name}" else f"import failed: {err}"
        except Exception as err:  # report, never crash `info`
            status[name] = f"import failed: {type(err).__name__}: {err}"
    return status


def _triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _gpu() -> dict | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"sm_{props.major}{props.minor}",
            "memory_GiB": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}


def _op_choices(device: torch.device) -> dict[str, dict]:
    """Per op: the backend that would run its example inputs on `device`, and why the others would not."""
    choices = {}
    for name, op in sorted(dispatch.REGISTRY.items()):
        entry = {"doc": op.doc}
        if op.example is None:
            entry["selected"] = None
            entry["reasons"] = {"*": ["no example inputs registered"]}
        else:
            try:
                args, kwargs = op.example(device)
                entry["reasons"] = op.explain(*args, **kwargs)
                entry["selected"] = op.select(*args, **kwargs).backend
            except Exception as err:
                entry["selected"] = None
                entry["error"] = f"{type(err).__name__}: {err}"
        choices[name] = entry
    return choices


def _forced_backend() -> str | None:
    """NITROKERNELS_BACKEND as the ops read it; an invalid value is reported, not raised (info must work then)."""
    try:
        return dispatch._env_forced() or None
    except ValueError as err:
        return f"invalid ({err})"


def collect() -> dict:
    modules = import_op_modules()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    build = _ext.build_info()
    return {
        "nitrokernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "triton_interpreter": dispatch.triton_interpreting(),
        "gpu": _gpu(),
        "extension": {"status": _ext.extension_status(), "archs": _ext.compiled_archs(),
                      "built_with_torch": build.get("torch"), "built_with_cuda": build.get("torch_cuda")},
        "forced_backend": _forced_backend(),
        "op_modules": modules,
        "device": str(device),
        "ops": _op_choices(device),
    }


def format_info(info: dict) -> str:
    gpu = info["gpu"]
    ext = info["extension"]
    lines = [
        f"nitrokernels {info['nitrokernels']}  (python {info['python']})",
        f"torch        {info['torch']}  CUDA {info['torch_cuda'] or 'none (CPU build)'}",
        f"triton       {info['triton'] or 'not installed'}"
        + ("  [interpreter on: TRITON_INTERPRET=1]" if info["triton_interpreter"] else ""),
        f"GPU          {gpu['name'] + ' ' + gpu['capability'] + ' ' + str(gpu['memory_GiB']) + ' GiB' if gpu else 'none'}",
        f"extension _C {ext['status']}" + (f"  archs {', '.join(ext['archs'])}" if ext["archs"] else ""),
    ]
    if info["forced_backend"]:
        lines.append(f"forced       NITROKERNELS_BACKEND={info['forced_backend']}")
    broken = {m: s for m, s in info["op_modules"].items() if s not in ("ok", "absent")}
    for module, status in broken.items():
        lines.append(f"op module    {module}: {status}")
    lines.append(f"\nops on {info['device']} (example inputs): backend that runs, then why the others do not")
    for name, entry in info["ops"].items():
        lines.append(f"  {name:<24} -> {entry.get('selected') or 'NONE'}")
        if "error" in entry:
            lines.append(f"  {'':<24}    error: {entry['error']}")
        for backend, reasons in entry.get("reasons", {}).items():
            if reasons and backend != entry.get("selected"):
                lines.append(f"  {'':<24}    {backend}: {'; '.join(reasons)}")
    return "\n".join(lines)


def info() -> dict:
    """Public entry point: the information `nitrokernels info` prints, as a dict."""
    return collect()


def print_info() -> None:
    print(format_info(collect()))


class _CallableModule(types.ModuleType):
    """`nitrokernels.info` is both this module and the function `nk.info()`: importing the submodule makes it the
    package's `info` attribute, which would shadow the function after the first call."""

    def __call__(self) -> dict:
        return info()


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":      # python -m nitrokernels.info
    print_info()
