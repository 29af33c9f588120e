"""GroupNorm + SiLU (issue 3) at the SDXL UNet shapes: the fused op against eager PyTorch and torch.compile.

Shapes (C, H, W) = (320, 128, 128), (640, 64, 64), (1280, 32, 32) (1024x1024 images: latent 128x128), 32 groups,
batch 1 and 2, bf16, NCHW and channels_last; forward ("fwd") and forward + backward ("fwd_bwd": gradients of x,
weight and bias, plus temb when present). Most cases have no temb (norm1 / conv_norm_out); the "temb" cases at
batch 2 are ResnetBlock2D's norm2 (h + temb -> norm -> SiLU). Variants, timed in the same run:

  fused     nitrokernels.ops.group_norm_silu with the default dispatch (the backend it picked is in the notes)
  cuda_ext  the same op with the CUDA C++ backend forced   (when the extension is built)
  triton    the same op with the Triton backend forced
  eager     F.silu(F.group_norm(x + temb[:, :, None, None], 32, w, b)) -- what diffusers runs
  compile   torch.compile of that same eager expression (inductor, default mode, static shapes; left out with
            NITROKERNELS_BENCH_COMPILE=0: about 30 compiles, minutes)

Byte floor (bytes_moved): the unavoidable traffic at the activation dtype -- forward reads x and writes out
(2 passes over the tensor); forward + backward adds reading x and dout and writing dx (5 passes in total; the
statistics are tiny). fraction_of_floor = floor / fused time, against the measured device-copy bandwidth.
Issue 3's targets: forward >= 0.8 of the floor, forward + backward >= 0.6, >= 4x eager, faster than compile.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import compile_baselines
from nitrokernels import _ext
from nitrokernels.ops import group_norm_silu, use_backend
from nitrokernels.ops.dispatch import triton_importable
from nitrokernels.ops.group_norm import GROUP_NORM_SILU, _cuda_ops_present

GROUPS = 32
DTYPE = torch.bfloat16
SHAPES = [(320, 128, 128), (640, 64, 64), (1280, 32, 32)]
CASES = [(batch, chw, layout, mode, False) for batch in (1, 2) for chw in SHAPES
         for layout in ("nchw", "channels_last") for mode in ("fwd", "fwd_bwd")]
CASES += [(2, chw, layout, "fwd_bwd", True) for chw in SHAPES for layout in ("nchw", "channels_last")]


def _id(case):
    batch, (c, h, w), layout, mode, temb = case
    return f"{mode}-b{batch}-{c}x{h}x{w}-{layout}{'-temb' if temb else ''}"


def eager_expression(x, weight, bias, temb):
    if temb is not None:
        x = x + temb[:, :, None, None]
    return F.silu(F.group_norm(x, GROUPS, weight, bias, 1e-5))


_COMPILED = {}


def compiled_expression():
    if "fn" not in _COMPILED:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _COMPILED["fn"] = torch.compile(eager_expression, dynamic=False)
    return _COMPILED["fn"]


def _forced(backend, fn):
    def run():
        with use_backend(backend, "group_norm_silu"):
            return fn()
    return run


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_group_norm_silu(nk_bench, case):
    batch, (c, h, w), layout, mode, has_temb = case
    train = mode == "fwd_bwd"
    x = torch.randn(batch, c, h, w, device="cuda", dtype=DTYPE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    weight = (1 + 0.1 * torch.randn(c, device="cuda")).to(DTYPE)
    bias = (0.1 * torch.randn(c, device="cuda")).to(DTYPE)
    temb = torch.randn(batch, c, device="cuda", dtype=DTYPE) if has_temb else None
    inputs = [t for t in (x, weight, bias, temb) if t is not None]
    if train:
        for t in inputs:
            t.requires_grad_(True)
        grad_out = torch.randn_like(x)

    def step(fn):
        def run():
            out = fn(x, weight, bias, temb)
            if train:
                torch.autograd.grad(out, inputs, grad_out)
            return out
        return run

    def fused_fn(x, weight, bias, temb):
        return group_norm_silu(x, GROUPS, weight, bias, 1e-5, temb=temb)

    variants = {"fused": step(fused_fn)}
    if _ext.extension_available() and _cuda_ops_present():
        variants["cuda_ext"] = _forced("cuda_ext", step(fused_fn))
    if triton_importable():
        variants["triton"] = _forced("triton", step(fused_fn))
    variants["eager"] = step(eager_expression)
    if compile_baselines():
        variants["compile"] = step(compiled_expression())
    for fn in variants.values():  # compile / autotune / first-launch costs stay out of the timings
        fn()
    torch.cuda.synchronize()

    chosen = GROUP_NORM_SILU.select(x, weight, bias, temb, GROUPS, 1e-5, True).backend
    passes = 5 if train else 2
    nk_bench.compare(
        f"group_norm_silu_{mode}",
        dict(batch=batch, channels=c, height=h, width=w, layout=layout, temb=has_temb, dtype=str(DTYPE)),
        variants, bytes_moved=passes * x.numel() * x.element_size(), dtype=DTYPE,
        notes=f"fused dispatched to {chosen}; floor = {passes} passes over the activation")
