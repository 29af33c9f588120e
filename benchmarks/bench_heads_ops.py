"""ops.head_stack (the one-level case of ops.head_levels) on ONE SDXL feature level: all sampled heads, forward +
backward, fused vs its baselines.

SDXL 1024² features (latent 128²), batch 5, bf16, hidden 256, GroupNorm(32), global heads (down to 4x4, then
a 4x4 conv), 40 sampled heads of one level (pool of 48, repeats allowed), gradients to the feature and to
every pooled parameter. Variants, timed in the same run:

  fused            ops.head_stack, Triton backend, weights read from the pool inside the kernels
  fused_gathered   (only while the kernels offer the choice, kernels.heads.weight_source) the same kernels with
                   NITROKERNELS_HEADS_WEIGHTS=gathered for the forward AND the backward (sampled weights copied
                   per launch into a GEMM-friendly [h, 4, 4, I, O] layout)
  fused_graph      `fused` captured in a CUDA graph (fixed head count, ids on the device)
  batched_eager    reference.head_stack_batched_eager: first layers as one conv with the gathered weights
                   concatenated, deeper layers as grouped convs (groups = heads), GroupNorm over heads*32 groups
  batched_graph    batched_eager captured in a CUDA graph (the "careful user" baseline of issue 7)
  loop             reference.head_stack_loop_reference: one head at a time (F.conv2d / group_norm / silu)

Every variant gets the same gradients: the feature's, and the SAMPLED heads' parameters only. The fused op
returns sparse rows of the pooled parameters; the baselines gather the sampled rows (inside the timed step) into
leaf tensors and differentiate those (a careful eager user's step; differentiating the pooled tensors instead
would add a dense zero-fill + scatter of every pooled head to each baseline).

FLOP floor: every conv's forward, data-gradient and weight-gradient GEMM (3x the forward FLOPs; the final conv
included) at the measured bf16 matmul rate; GroupNorm/SiLU and memory traffic are ignored. Peak memory is
recorded per variant (for graph variants it is the replay's, the graph's pool being allocated at capture).

    pytest benchmarks/bench_heads_ops.py --benchmark-only      (GPU; writes benchmarks/results/<gpu>-<date>.json)
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import nitrokernels.kernels.heads as heads_kernels
from nitrokernels.nn.head_pool import HeadPool
from nitrokernels.ops.dispatch import use_backend
from nitrokernels.ops.heads import head_stack
from nitrokernels.ops.reference import head_stack_batched_eager, head_stack_loop_reference

BATCH, HIDDEN, GROUPS, POOL, HEADS = 5, 256, 32, 48, 40
DTYPE = torch.bfloat16
LEVELS = [(320, 128), (640, 64), (1280, 32)]          # the three SDXL level shapes with the most work


def level_flops(channels: int, size: int, heads: int, batch: int = BATCH, hidden: int = HIDDEN, k: int = 4) -> float:
    """Forward + dX + dW FLOPs of the convs of `heads` global heads on one level."""
    forward, c_in = 0.0, channels
    while size > k:
        size //= 2
        forward += 2.0 * batch * size * size * hidden * c_in * 16
        c_in = hidden
    forward += 2.0 * batch * hidden * k * k
    return 3.0 * forward * heads


def make_level(channels: int, size: int, device="cuda"):
    """Feature (requires grad), pooled parameters (require grad) and 40 sampled ids of one level."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def param(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=DTYPE).requires_grad_(True)
    depth, s = 0, size
    while s > 4:
        s //= 2
        depth += 1
    conv_w, conv_b, norm_w, norm_b = [], [], [], []
    c_in = channels
    for _ in range(depth):
        if GEMM_MAJOR:   # stored as HeadPool stores them ([P, 4, 4, I, O]), passed as the [P, O, I, 4, 4] view
            conv_w.append(param(POOL, 4, 4, c_in, HIDDEN, scale=(c_in * 16) ** -0.5).permute(0, 4, 3, 1, 2))
        else:
            conv_w.append(param(POOL, HIDDEN, c_in, 4, 4, scale=(c_in * 16) ** -0.5))
        conv_b.append(param(POOL, HIDDEN, scale=0.02))
        norm_w.append((1 + param(POOL, HIDDEN, scale=0.1)).detach().requires_grad_(True))
        norm_b.append(param(POOL, HIDDEN, scale=0.1))
        c_in = HIDDEN
    final_w, final_b = param(POOL, 1, HIDDEN, 4, 4, scale=(HIDDEN * 16) ** -0.5), param(POOL, 1, scale=0.02)
    feature = torch.randn(BATCH, channels, size, size, generator=g).to(device=device, dtype=DTYPE).requires_grad_(True)
    ids = torch.randint(0, POOL, (HEADS,), generator=g).to(device)
    return (feature, conv_w, conv_b, norm_w, norm_b, final_w, final_b), ids


def _inputs(args):
    feature, conv_w, conv_b, norm_w, norm_b, final_w, final_b = args
    return [feature, *conv_w, *conv_b, *norm_w, *norm_b, final_w, final_b]


def step_fn(fn, args, ids, env=None):
    """Forward + backward of `fn` with gradients to the feature and the pooled parameters (the fused op returns
    sparse rows); `env`: environment variables set for the WHOLE step, backward included."""
    grad_out = torch.randn(HEADS, BATCH, device="cuda", dtype=DTYPE)
    inputs = _inputs(args)

    def step():
        with _environment(env or {}):
            out = fn(*args, ids, GROUPS)
            return torch.autograd.grad(out, inputs, grad_out)
    return step


def baseline_step_fn(fn, args, ids):
    """Forward + backward of an eager baseline with gradients to the feature and to the sampled heads' rows only:
    the rows are gathered (inside the step) into leaves, the baseline runs on them with ids 0..h-1."""
    grad_out = torch.randn(HEADS, BATCH, device="cuda", dtype=DTYPE)
    feature, *pooled = args
    local_ids = torch.arange(HEADS, device=ids.device)

    def step():
        rows = [[w.detach().index_select(0, ids).requires_grad_(True) for w in group] for group in pooled[:4]]
        final = [w.detach().index_select(0, ids).requires_grad_(True) for w in pooled[4:]]
        out = fn(feature, *rows, *final, local_ids, GROUPS)
        return torch.autograd.grad(out, [feature, *(w for group in rows for w in group), *final], grad_out)
    return step


@contextlib.contextmanager
def _environment(env: dict):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fused(*args):
    with use_backend("triton", "head_stack"):
        return head_stack(*args)


HAS_WEIGHT_SOURCES = hasattr(heads_kernels, "weight_source")    # the pool / gathered choice (may be removed)
GEMM_MAJOR = hasattr(HeadPool, "conv_weights_oihw")               # HeadPool keeps conv weights [P, 4, 4, I, O]


def graphed(step):
    """Capture `step` (forward + backward) in a CUDA graph; returns the replay, or None if capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as err:   # reported in the notes, the other variants still run
        return None, f"capture failed: {err}"[:300]
    return graph.replay, ""


@pytest.mark.parametrize("channels, size", LEVELS, ids=[f"{c}x{s}" for c, s in LEVELS])
def test_head_stack_level(nk_bench, channels, size):
    torch.manual_seed(0)
    args, ids = make_level(channels, size)
    variants = {"fused": step_fn(fused, args, ids)}
    notes = []

    def add_graphed(name, step):  # a failed capture becomes a note; the other variants still run
        replay, why = graphed(step)
        if replay is not None:
            variants[name] = replay
        else:
            notes.append(f"{name}: {why}")

    # fused-type and baseline variants alternate (the harness times them one after another)
    variants["batched_eager"] = baseline_step_fn(head_stack_batched_eager, args, ids)
    if HAS_WEIGHT_SOURCES:
        variants["fused_gathered"] = step_fn(fused, args, ids, env={"NITROKERNELS_HEADS_WEIGHTS": "gathered"})
    add_graphed("batched_graph", baseline_step_fn(head_stack_batched_eager, args, ids))
    add_graphed("fused_graph", step_fn(fused, args, ids))
    variants["loop"] = baseline_step_fn(head_stack_loop_reference, args, ids)
    nk_bench.compare(f"head_stack {channels}x{size}", {"channels": channels, "size": size, "heads": HEADS,
                                                        "batch": BATCH, "hidden": HIDDEN, "dtype": "bfloat16"},
                     variants, flops=level_flops(channels, size, HEADS), dtype=DTYPE, memory=True,
                     notes="; ".join(notes), reps=20)
