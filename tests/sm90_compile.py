"""Compile every Triton launch of nitrokernels' host code for an H100 (sm_90a) without a GPU.

    TRITON_INTERPRET= python tests/sm90_compile.py [family ...] [dtype ...]   -> JSON lines on stdout

families: heads, group_norm, attention, geglu (default: all); dtypes: bfloat16, float16, float32 (default: each
family's default dtypes). A dtype the op's Triton backend refuses on a GPU (its `_triton_reasons`, e.g. fp32 attention /
geglu) is skipped with a {"skipped": ...} line. One line per distinct launch (kernel, constexprs, signature,
options: what the JIT would compile separately): registers, spill bytes, shared memory, wgmma / cp.async counts,
and "hot_loops": per tensor-core hot loop of its sm_90a SASS (nitrokernels._sass: the innermost backward branch
holding HGMMA) its per-iteration counts, cycles and the refusals of the CI hot-loop check (NK_SM90_SASS=0 skips
the disassembly); per distinct autotuned call a {"tuning": kernel, ...} line (its candidate configs and their
"ids", their fewest and most spill bytes); one {"summary": family, ...} line per family and dtype.
NK_SM90_CACHE=dir keeps Triton's cache there between runs (development); NK_SM90_SASS_DIR=dir writes the SASS.

How: each family's host code runs on `meta` tensors at SDXL shapes with JITFunction.run replaced by a recorder;
autotuned kernels record every config that survives the autotuner's pruning (any of them may win on the GPU).
Each distinct launch is then compiled by Triton for sm_90 and assembled with the bundled ptxas for sm_90a.
Needs Triton's NVIDIA backend and ptxas (bundled in the Triton wheel); no GPU, no CUDA driver. The tests
(tests/test_build.py, tests/test_heads_ops.py) run this in a subprocess: the test process has the interpreter on.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import itertools
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # the kernel modules pick their GPU tile plans at import
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nitrokernels import _sass  # noqa: E402

# SASS hot-loop facts per compiled launch (nvdisasm); NK_SM90_SASS=0 skips them
SASS = os.environ.get("NK_SM90_SASS", "1") != "0"
_sass_ids = itertools.count()

ARCH = 90
H100_SMS = 132
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32"}
_launches: list = []
_grids: list = []         # the grid of each recorded launch (same order)


# ================================================================================== recording launches
_tuning = [None]  # the autotuned call being recorded (json: kernel, its non-config constexprs, call no.)
_tuning_ids = itertools.count()


def _record(self, *args, grid, warmup, **kwargs):
    _launches.append((self, args, kwargs, _tuning[0]))
    _grids.append(_resolve_grid(self, grid, args, kwargs))


def _resolve_grid(fn, grid, args, kwargs):
    """The launch grid as a 3-tuple of ints (a callable grid gets the launch's arguments and constexprs)."""
    if callable(grid):
        meta = dict(zip(fn.arg_names, args))
        meta.update(kwargs)
        grid = grid(meta)
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


def _record_autotuned(self, *args, **kwargs):
    """Every config the autotuner would benchmark (after its pruning) is a launch the GPU may run."""
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
    fixed = {k: v for k, v in kwargs.items() if k in self.arg_names}
    _tuning[0] = json.dumps([self.base_fn.__name__, fixed, next(_tuning_ids)])
    for config in configs:
        self.fn.run(*args, **kwargs, **config.all_kwargs())
    self.nargs, _tuning[0] = None, None


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


# ================================================================================== compiling launches
def _type(v):
    """(signature type, specialise as constexpr?, 16-divisible?) of one argument value, like Triton's JIT.
    Tensors count as 16-byte aligned (allocations are; no recorded case launches on an offset view)."""
    if v is None:
        return "constexpr", True, False
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


def specialise(fn, args, kwargs):
    """(signature, constexprs, attrs, options) the JIT would compile this launch with (16-divisible ints,
    ints == 1 as constexprs; tuple arguments element by element). Kwargs that are not kernel parameters
    (num_warps, num_stages, ...) are compile options."""
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", v
            continue
        elements = list(enumerate(v)) if isinstance(v, tuple) else [(None, v)]
        types = []
        for j, e in elements:
            ty, const, div = _type(e)
            types.append(ty)
            path = (i,) if j is None else (i, j)
            if const:
                constexprs[name if j is None else path] = e
            if div:
                attrs[path] = [["tt.divisibility", 16]]
        signature[name] = tuple(types) if isinstance(v, tuple) else types[0]
    return signature, constexprs, attrs, options


def _ptxas(ptx: str, name: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(ARCH).path, "-v", f"--gpu-name=sm_{ARCH}a", path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode:
        raise RuntimeError(f"ptxas failed for {name}: {log[-2000:]}")
    return log


def compile_launch(fn, args, kwargs) -> dict:
    """Compile one recorded launch for sm_90a; registers / spills / shared memory as ptxas and Triton report."""
    signature, constexprs, attrs, options = specialise(fn, args, kwargs)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", ARCH, 32), options=options)
    ptx = compiled.asm["ptx"]
    log = _ptxas(ptx, fn.__name__)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", log)]
    result = {"kernel": fn.__name__, "constexprs": {k: v for k, v in kwargs.items() if k in fn.arg_names},
              "options": options, "shared": compiled.metadata.shared, "registers": max(regs or [0]),
              "spill_bytes": max(spills or [0]), "wgmma": ptx.count("wgmma.mma_async"),
              "cp_async": ptx.count("cp.async.c"), "num_warps": compiled.metadata.num_warps}
    if SASS:
        result["hot_loops"] = hot_loop_facts(compiled.asm["cubin"], compiled.metadata.num_warps, fn.__name__)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def hot_loop_facts(cubin: bytes, warps: int, name: str) -> list[dict]:
    """Per tensor-core hot loop of the kernel's SASS (nitrokernels._sass): its counts, cycles per iteration and
    what the CI check refuses in it. NK_SM90_SASS_DIR=dir also writes the SASS text there."""
    text = _sass.disassemble(cubin)
    if os.environ.get("NK_SM90_SASS_DIR"):
        os.makedirs(os.environ["NK_SM90_SASS_DIR"], exist_ok=True)
        with open(os.path.join(os.environ["NK_SM90_SASS_DIR"], f"{name}-{next(_sass_ids)}.sass"), "w") as f:
            f.write(text)
    facts = []
    for instrs in _sass.parse(text).values():
        for loop in _sass.hot_loops(instrs):
            d = loop.summary()
            d.update(cycles=loop.cycles(warps), problems=_sass.problems(loop, warps))
            facts.append(d)
    return facts


def _key(fn, args, kwargs):
    """Launches differing only in which ints are 16-divisible share a key (the first one is compiled): the
    alignment hints only widen memory accesses, and compiling every combination would multiply CI time."""
    signature, constexprs, _, options = specialise(fn, args, kwargs)
    return fn.__name__, repr(signature), repr(sorted(constexprs.items(), key=repr)), repr(sorted(options.items()))


# ============================================================================================ heads
def _gemm_layout_pool() -> bool:
    """Whether HeadPool stores its conv weights in the GEMM layout [P, 4, 4, I, O] (then it passes the ops the
    [P, O, I, 4, 4]-shaped view w.permute(0, 4, 3, 1, 2), and so does this recording)."""
    from nitrokernels.nn.head_pool import HeadPool

    return hasattr(HeadPool, "conv_weights_oihw")


def _level_params(dtype, channels, depth, k, hidden, pool):
    conv_w, conv_b, norm_w, norm_b = [], [], [], []
    c_in = channels
    gemm = _gemm_layout_pool()
    for _ in range(depth):
        conv_w.append(_meta(pool, 4, 4, c_in, hidden, dtype=dtype).permute(0, 4, 3, 1, 2) if gemm
                      else _meta(pool, hidden, c_in, 4, 4, dtype=dtype))
        conv_b.append(_meta(pool, hidden, dtype=dtype))
        norm_w.append(_meta(pool, hidden, dtype=dtype))
        norm_b.append(_meta(pool, hidden, dtype=dtype))
        c_in = hidden
    return conv_w, conv_b, norm_w, norm_b, _meta(pool, 1, hidden, k, k, dtype=dtype), _meta(pool, 1, dtype=dtype)


def _heads_levels(dtype, levels, k, batch=5, heads=4, hidden=256, groups=32, pool=8):
    """The multi-level forward + backward host code; levels: [(channels, size, depth)], `heads` heads each."""
    import nitrokernels.kernels.heads as kernels

    features = [_meta(batch, c, s, s, dtype=dtype) for c, s, _ in levels]
    params = [_level_params(dtype, c, depth, k, hidden, pool) for c, _, depth in levels]
    lists = [[p[i] for p in params] for i in range(6)]
    ids = _meta(heads * len(levels), dtype=torch.long)
    counts, offsets = [heads] * len(levels), [0] * len(levels)
    out, ys, stats, affine = kernels.levels_forward(features, *lists, ids, counts, offsets, groups, 1e-5)
    kernels.levels_backward(torch.empty_like(out), features, *lists, ids, counts, offsets, ys, stats, affine, groups,
                            1e-5, [True] * len(levels), True)


# SDXL feature levels at 1024² (global heads to 4x4: depths 5 / 4 / 3), hidden 256, batch 5: the whole
# 10-level pool in one call, and single levels (the head_stack case; one local-head level).
_SDXL_LEVELS = [(320, 128, 5)] * 3 + [(320, 64, 4), (640, 64, 4), (640, 64, 4), (640, 32, 3)] + [(1280, 32, 3)] * 3
_HEADS_CASES = [(_SDXL_LEVELS, 4), ([(320, 128, 5)], 4), ([(1280, 32, 3)], 4), ([(640, 64, 3)], 1)]


def heads(dtype):
    for case in _HEADS_CASES:
        _heads_levels(dtype, *case)


# ======================================================================================= group_norm
# SDXL UNet GroupNorms at 1024² (latent 128², batch 2): (channels, size) of every resnet / transformer norm.
_GN_SHAPES = [(320, 128), (640, 128), (960, 128), (320, 64), (640, 64), (960, 64), (1280, 64), (1920, 64),
              (1280, 32), (1920, 32), (2560, 32)]


def _gn_accepts(dtype):
    from nitrokernels.ops.group_norm import _triton_reasons

    x = _meta(2, 320, 8, 8, dtype=dtype)
    return _triton_reasons(x, None, None, None, 32, 1e-5, True)


def group_norm(dtype):
    """Forward + backward of the triton backend: resnet norm2 (temb + SiLU), norm1 (SiLU), transformer norm
    (no act); NCHW and channels_last; norm parameters in x's dtype and in fp32 (autocast)."""
    import nitrokernels.kernels.group_norm as kernels
    from nitrokernels.ops.group_norm import GROUP_NORM_SILU

    # the tile plan asks the CUDA runtime for the SM count; meta tensors have no CUDA device: plan for an H100
    kernels._num_sms = lambda index: H100_SMS
    torch.cuda.current_device = lambda: 0
    impl = GROUP_NORM_SILU.impls["triton"].fn
    for c, size in _GN_SHAPES:
        for channels_last in (False, True):
            x = _meta(2, c, size, size, dtype=dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            for pdtype in {dtype, torch.float32}:
                w, b = _meta(c, dtype=pdtype), _meta(c, dtype=pdtype)
                for temb, act, eps in ((_meta(2, c, dtype=dtype), True, 1e-5), (None, True, 1e-5),
                                       (None, False, 1e-6)):
                    out, mean, rstd = impl(x, w, b, temb, 32, eps, act)
                    impl.backward(torch.empty_like(out), x, w, b, temb, mean, rstd, 32, eps, act)


# ======================================================================================== attention
def _tokens(batch, length, heads, d, dtype):
    """[B, H, L, D] as the attention processor passes it: a transposed view of a [B, L, H*D] projection."""
    return _meta(batch, length, heads * d, dtype=dtype).view(batch, length, heads, d).transpose(1, 2)


# SDXL at 1024²: self-attention 4096 tokens x 10 heads and 1024 x 20 (head dim 64), cross-attention to 77 text
# tokens; head dim 128 at the same sizes (half the heads). (Lq, Lk, heads, head dim), batch 2.
_ATTN_CASES = [(4096, 4096, 10, 64), (1024, 1024, 20, 64), (4096, 77, 10, 64), (1024, 77, 20, 64),
               (4096, 4096, 5, 128), (1024, 1024, 10, 128), (4096, 77, 5, 128), (1024, 77, 10, 128)]


def _attn_accepts(dtype):
    from nitrokernels.ops.attention import _triton_reasons

    q = _meta(2, 10, 64, 64, dtype=dtype)
    return _triton_reasons(q, q, q)


def attention(dtype):
    """flash_attn_fwd / flash_attn_bwd (what the triton backend's custom ops run), on transposed-view inputs
    and once on contiguous [B, H, L, D] ones."""
    import nitrokernels.kernels.attention as kernels

    # the dK/dV query split is sized from the SM count (4 for non-CUDA devices): plan for an H100
    kernels._num_sms = lambda device: H100_SMS
    for lq, lk, h, d in _ATTN_CASES:
        layouts = [tuple(_tokens(2, n, h, d, dtype) for n in (lq, lk, lk))]
        if lq == lk:
            layouts.append(tuple(_meta(2, h, lq, d, dtype=dtype) for _ in range(3)))
        for q, k, v in layouts:
            out, lse = kernels.flash_attn_forward(q, k, v, d ** -0.5)
            kernels.flash_attn_backward(torch.empty_like(out), q, k, v, out, lse, d ** -0.5)


# ============================================================================================ geglu
# SDXL transformer feed-forwards at 1024², batch 2: (tokens, dim); weight [2 * 4 * dim, dim].
_GEGLU_CASES = [(2 * 4096, 640), (2 * 1024, 1280)]


def _geglu_accepts(dtype):
    from nitrokernels.ops.geglu import _triton_reasons

    x = _meta(4, 64, dtype=dtype)
    return _triton_reasons(x, _meta(128, 64, dtype=dtype), _meta(128, dtype=dtype))


def geglu(dtype):
    """geglu_fwd (inference and training: with the saved projection) and geglu_bwd_act."""
    import nitrokernels.kernels.geglu as kernels

    for m, dim in _GEGLU_CASES:
        x, w, b = _meta(m, dim, dtype=dtype), _meta(8 * dim, dim, dtype=dtype), _meta(8 * dim, dtype=dtype)
        kernels.geglu_forward(x, w, b, False)
        out, pre = kernels.geglu_forward(x, w, b, True)
        kernels.geglu_backward_act(torch.empty_like(out), pre)


# ============================================================================================== main
# family: (record(dtype), reasons the Triton backend refuses dtype on a GPU, default dtypes)
FAMILIES = {
    "heads": (heads, lambda dtype: [], ("bfloat16", "float32")),
    "group_norm": (group_norm, _gn_accepts, ("bfloat16", "float16", "float32")),
    "attention": (attention, _attn_accepts, ("bfloat16", "float16")),
    "geglu": (geglu, _geglu_accepts, ("bfloat16", "float16")),
}


def _print_tunings(family, dtype_name, tunings):
    """Per distinct autotuned call: how many configs it may pick from, and the fewest spill bytes among them."""
    printed = set()
    for tuning, by_key in tunings.items():
        kernel, fixed, _ = json.loads(tuning)
        if (kernel, tuple(sorted(by_key))) in printed:
            continue
        printed.add((kernel, tuple(sorted(by_key))))
        results = list(by_key.values())
        print(json.dumps({"tuning": kernel, "family": family, "dtype": dtype_name, "constexprs": fixed,
                          "configs": len(results), "min_spill_bytes": min(r["spill_bytes"] for r in results),
                          "max_spill_bytes": max(r["spill_bytes"] for r in results),
                          "ids": [r["id"] for r in results]}), flush=True)


def run_family(name, dtypes, seen):
    record, refusals, default = FAMILIES[name]
    for dtype_name in dtypes or default:
        dtype = getattr(torch, dtype_name)
        reasons = refusals(dtype)
        if reasons:
            print(json.dumps({"skipped": name, "dtype": dtype_name, "reasons": reasons}), flush=True)
            continue
        _launches.clear()
        _grids.clear()
        record(dtype)
        start, count, tunings = time.perf_counter(), 0, {}
        for fn, args, kwargs, tuning in list(_launches):
            key = _key(fn, args, kwargs)
            if key not in seen:
                seen[key] = compile_launch(fn, args, kwargs)
                seen[key].update(family=name, dtype=dtype_name, id=len(seen) - 1)
                print(json.dumps(seen[key]), flush=True)
                count += 1
            if tuning is not None:
                tunings.setdefault(tuning, {})[key] = seen[key]
        _print_tunings(name, dtype_name, tunings)
        print(json.dumps({"summary": name, "dtype": dtype_name, "recorded": len(_launches), "launches": count,
                          "seconds": round(time.perf_counter() - start, 1), "triton": triton.__version__}),
              flush=True)


def record_launches(record, *args, **kwargs) -> list[tuple]:
    """Run `record(*args, **kwargs)` (host code on meta tensors) with launches recorded, not run:
    [(JITFunction, args, kwargs, grid)] in launch order (autotuned calls: one entry per candidate config)."""
    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = _record, _record_autotuned
    _launches.clear()
    _grids.clear()
    try:
        record(*args, **kwargs)
    finally:
        JITFunction.run, Autotuner.run = saved
    return [(fn, a, kw, grid) for (fn, a, kw, _), grid in zip(_launches, _grids)]


def compiled(fn, args, kwargs, seen: dict) -> dict:
    """compile_launch, once per specialisation key (`seen` is the cache)."""
    key = _key(fn, args, kwargs)
    if key not in seen:
        seen[key] = compile_launch(fn, args, kwargs)
    return seen[key]


def main(argv):
    families = [a for a in argv if a in FAMILIES] or list(FAMILIES)
    dtypes = [a for a in argv if a not in FAMILIES]
    JITFunction.run = _record
    Autotuner.run = _record_autotuned
    seen = {}  # specialisation key -> compile result
    if os.environ.get("NK_SM90_CACHE"):   # development: reuse Triton's compiled kernels across runs
        os.environ["TRITON_CACHE_DIR"] = os.environ["NK_SM90_CACHE"]
        for name in families:
            run_family(name, dtypes, seen)
        return
    # a fresh Triton cache: every launch really compiles (honest timings), and no one else's cache is touched
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        for name in families:
            run_family(name, dtypes, seen)


if __name__ == "__main__":
    main(sys.argv[1:])
