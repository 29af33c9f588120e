"""Compile every Triton launch of ops.head_levels / head_stack (forward + backward) for sm_90 without a GPU.

    TRITON_INTERPRET= python tests/heads_sm90_compile.py [bfloat16 float32 ...]   -> JSON lines on stdout

The host code runs on `meta` tensors at SDXL head shapes -- the 10-level SDXL pool in ONE multi-level call
(levels of depth 5 / 4 / 3, tuple-of-pointer arguments) and single levels -- with the launches recorded
instead of run; each
distinct launch is then compiled by Triton for an H100 (sm_90a) and assembled with the bundled ptxas, which
reports registers, spills and shared memory. tests/test_heads_ops.py runs this in a subprocess (the test
process itself has the interpreter on) and checks that every kernel fits and that bf16 kernels do not spill.
Needs Triton's NVIDIA backend and ptxas (bundled in the Triton wheel); no GPU, no CUDA driver.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nitrokernels.kernels.heads as kernels  # noqa: E402

ARCH = 90
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32"}
_launches: list = []


def _record(self, *args, grid, warmup, **kwargs):
    _launches.append((self, args, kwargs))


def _type(v):
    """(signature type, specialise as constexpr?, 16-divisible?) of one argument value, like Triton's JIT."""
    if isinstance(v, torch.Tensor):
        return "*" + _TYPES[v.dtype], False, True
    if isinstance(v, bool):
        return "i1", False, False
    if isinstance(v, int):
        if v == 1:
            return "constexpr", True, False
        return ("i32" if -2**31 <= v < 2**31 else "i64"), False, v % 16 == 0
    if isinstance(v, float):
        return "fp32", False, False
    raise TypeError(f"cannot type argument {v!r}")


def compile_launch(fn, args, kwargs) -> dict:
    """Compile one recorded launch like Triton's JIT would specialise it (16-divisible ints, ints == 1),
    tuple arguments (one entry per level) element by element."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, args))
    values.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", v
            continue
        if isinstance(v, tuple):
            types = []
            for j, e in enumerate(v):
                ty, const, div = _type(e)
                types.append(ty)
                if const:
                    constexprs[(i, j)] = e
                if div:
                    attrs[(i, j)] = [["tt.divisibility", 16]]
            signature[name] = tuple(types)
            continue
        ty, const, div = _type(v)
        signature[name] = ty
        if const:
            constexprs[name] = v
        if div:
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", ARCH, 32), options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(ARCH).path, "-v", f"--gpu-name=sm_{ARCH}a", path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode:
        raise RuntimeError(f"ptxas failed for {fn.__name__}: {log[-2000:]}")
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", log)]
    return {"kernel": fn.__name__, "constexprs": {k: v for k, v in kwargs.items()}, "options": options,
            "shared": compiled.metadata.shared, "registers": max(regs or [0]), "spill_bytes": max(spills or [0]),
            "wgmma": ptx.count("wgmma.mma_async"), "cp_async": ptx.count("cp.async.c")}


def _level_params(dtype, channels, depth, k, hidden, pool):
    def empty(*shape):
        return torch.empty(*shape, dtype=dtype, device="meta")
    conv_w, conv_b, norm_w, norm_b = [], [], [], []
    c_in = channels
    for _ in range(depth):
        conv_w.append(empty(pool, hidden, c_in, 4, 4))
        conv_b.append(empty(pool, hidden))
        norm_w.append(empty(pool, hidden))
        norm_b.append(empty(pool, hidden))
        c_in = hidden
    return conv_w, conv_b, norm_w, norm_b, empty(pool, 1, hidden, k, k), empty(pool, 1)


def record_levels(dtype, levels, k, batch=5, heads=4, hidden=256, groups=32, pool=8):
    """Run the multi-level forward + backward host code on meta tensors, recording the kernel launches.
    levels: [(channels, size, depth)]; every level gets `heads` sampled heads."""
    features = [torch.empty(batch, c, s, s, dtype=dtype, device="meta") for c, s, _ in levels]
    params = [_level_params(dtype, c, depth, k, hidden, pool) for c, _, depth in levels]
    lists = [[p[i] for p in params] for i in range(6)]
    ids = torch.empty(heads * len(levels), dtype=torch.long, device="meta")
    counts, offsets = [heads] * len(levels), [0] * len(levels)
    _launches.clear()
    out, ys, stats, affine = kernels.levels_forward(features, *lists, ids, counts, offsets, groups, 1e-5)
    kernels.levels_backward(torch.empty_like(out), features, *lists, ids, counts, offsets, ys, stats, affine, groups,
                            1e-5, [True] * len(levels), True)
    return list(_launches)


# SDXL feature levels at 1024² (global heads to 4x4: depths 5 / 4 / 3), hidden 256, batch 5: the whole
# 10-level pool in one call, and single levels (the head_stack case; one local-head level).
SDXL = [(320, 128, 5)] * 3 + [(320, 64, 4), (640, 64, 4), (640, 64, 4), (640, 32, 3)] + [(1280, 32, 3)] * 3
CASES = [(SDXL, 4), ([(320, 128, 5)], 4), ([(1280, 32, 3)], 4), ([(640, 64, 3)], 1)]


def main(dtypes):
    JITFunction.run = _record
    seen = set()
    for dtype in dtypes:
        for case in CASES:
            for fn, args, kwargs in record_levels(dtype, *case):
                key = (fn.__name__, str(dtype), tuple(sorted(kwargs.items())),
                       tuple(len(a) if isinstance(a, tuple) else -1 for a in args))
                if key in seen:
                    continue
                seen.add(key)
                result = compile_launch(fn, args, kwargs)
                result["dtype"] = str(dtype).replace("torch.", "")
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main([getattr(torch, name) for name in sys.argv[1:]] or [torch.bfloat16, torch.float32])
