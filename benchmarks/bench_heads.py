"""Grouped discriminator heads (issue 7): HeadPool forward+backward on SDXL 1024² features vs its baselines.

SDXL features at 1024² (latent 128², the 10 levels of NitroFusion), batch 5, bf16, hidden 256, global heads,
10 / 40 / 160 sampled heads (1 / 4 / 16 per level) of one pool with 16 heads per level. Variants, same run:

  fused          HeadPool(features, ids) with ids from pool.sample (no host sync), gradients to the features
                 and to the pooled weights (sparse rows): all 10 levels in ONE ops.head_levels call (one
                 Triton launch per kernel type per layer depth: 11 forward, 21 backward at these shapes)
  fused_per_level  the same kernels with one ops.head_stack call per level (HeadPool's previous form:
                 49 forward, 127 backward Triton launches plus the per-level host-side GroupNorm glue)
  fused+graph    the same step captured in a CUDA graph (when capture works; reported beside the others)
  eager_loop     the Python loop over the sampled heads as plain torch modules (pool.as_module)
  batched+graph  the careful eager form (nitrokernels.ops.reference.head_stack_batched_eager: first layers
                 batched by concatenated weights, deeper layers as grouped convs, GroupNorm over heads x 32
                 groups), one call per level, forward+backward captured in a CUDA graph

Every variant computes the same gradients: the features', and the sampled heads' parameters only (the fused
variants return sparse rows of the pooled tensors; eager_loop differentiates its per-head module copies;
batched+graph gathers the sampled rows into leaves inside the step and differentiates those, not the pooled
tensors, which would add a dense zero-fill + scatter of all 160 pooled heads). Variants are passed to the
harness fused-type and baseline alternately.

The FLOP floor counts every conv's forward, data-gradient and weight-gradient GEMMs (3x the forward FLOPs)
at the measured bf16 matmul rate; GroupNorm / SiLU and memory traffic are ignored. Peak memory is measured
per call above what is allocated before it; a graph's memory lives in its private pool, allocated at capture,
so for the graph variants the pool's size is recorded in the notes.
"""
from __future__ import annotations

import pytest
import torch

from nitrokernels.nn.head_pool import SDXL_LEVELS, HeadPool
from nitrokernels.ops.heads import head_stack
from nitrokernels.ops.reference import head_stack_batched_eager

BATCH = 5
HIDDEN = 256
HEADS_PER_LEVEL = 16
DTYPE = torch.bfloat16


def head_flops(levels, counts, hidden: int, batch: int, kind: str = "global", local_size: int = 8) -> float:
    """Forward + backward (dX and dW) FLOPs of the convs of `counts[l]` heads on each level."""
    total = 0.0
    target = 4 if kind == "global" else local_size
    for (channels, size), count in zip(levels, counts):
        forward = 0.0
        cin = channels
        while size > target:
            size //= 2
            forward += 2.0 * batch * hidden * size * size * cin * 16
            cin = hidden
        k = 4 if kind == "global" else 1
        out_size = 1 if kind == "global" else size
        forward += 2.0 * batch * out_size * out_size * hidden * k * k
        total += 3 * forward * count
    return total


@pytest.fixture(scope="module")
def setup():
    if not torch.cuda.is_available():
        pytest.skip("benchmarks need a CUDA GPU")
    torch.manual_seed(0)
    pool = HeadPool(SDXL_LEVELS, heads_per_level=HEADS_PER_LEVEL, hidden=HIDDEN, device="cuda", dtype=DTYPE)
    features = [torch.randn(BATCH, c, s, s, device="cuda", dtype=DTYPE, requires_grad=True) for c, s in pool.levels]
    return pool, features


def _graph(fn, warmup: int = 3):
    """Capture `fn` (forward+backward) in a CUDA graph; returns (replay, MiB held by the graph's pool)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay, (torch.cuda.memory_allocated() - before) / 2**20


@pytest.mark.parametrize("heads", [10, 40, 160])
def test_heads_forward_backward(nk_bench, setup, heads):
    pool, features = setup
    per_level = heads // len(pool.levels)
    ids = pool.sample(per_level, generator=torch.Generator(device="cuda").manual_seed(heads))
    params = list(pool.parameters())
    grad_out = torch.randn(pool.output_shape(heads, BATCH), device="cuda", dtype=DTYPE)

    def fused():
        out = pool(features, ids)
        return torch.autograd.grad(out, features + params, grad_out, allow_unused=True)

    id_list = ids.tolist()
    modules = [pool.as_module(h) for h in id_list]
    loop_params = [p for m in modules for p in m.parameters()]

    def eager_loop():
        out = torch.stack([m(features[h // HEADS_PER_LEVEL])[:, 0, 0, 0] for h, m in zip(id_list, modules)])
        return torch.autograd.grad(out, features + loop_params, grad_out)

    rows = [torch.tensor([h - level * HEADS_PER_LEVEL for h in id_list[level * per_level:(level + 1) * per_level]],
                         device="cuda") for level in range(len(pool.levels))]

    local = torch.arange(per_level, device="cuda")

    def conv_weights(level):   # [P, O, I, 4, 4]-shaped conv weights of a level (a view if stored GEMM-major)
        if hasattr(pool, "conv_weights_oihw"):
            return list(pool.conv_weights_oihw(level))
        return list(pool.pools[level].conv_weight)

    def batched_eager():   # gradients to the features and the sampled rows (gathered leaves), as fused gets
        outs, leaves = [], []
        for level, p in enumerate(pool.pools):
            def take(t):
                leaf = t.detach().index_select(0, rows[level]).requires_grad_(True)
                leaves.append(leaf)
                return leaf
            outs.append(head_stack_batched_eager(
                features[level], [take(w) for w in conv_weights(level)], [take(b) for b in p.conv_bias],
                [take(w) for w in p.norm_weight], [take(b) for b in p.norm_bias], take(p.final_weight),
                take(p.final_bias), local, num_groups=pool.num_groups, eps=pool.eps))
        return torch.autograd.grad(torch.cat(outs), features + leaves, grad_out)

    def fused_per_level():   # one head_stack call per level, outputs concatenated
        outs = [head_stack(features[level], conv_weights(level), list(p.conv_bias), list(p.norm_weight),
                           list(p.norm_bias), p.final_weight, p.final_bias, rows[level], num_groups=pool.num_groups,
                           eps=pool.eps) for level, p in enumerate(pool.pools)]
        return torch.autograd.grad(torch.cat(outs), features + params, grad_out, allow_unused=True)

    variants = {"fused": fused}
    notes = []
    batched_graph, batched_mb = _graph(batched_eager)
    variants["batched+graph"] = batched_graph
    notes.append(f"batched+graph pool {batched_mb:.0f} MiB")
    try:
        fused_graph, fused_mb = _graph(fused)
        variants["fused+graph"] = fused_graph
        notes.append(f"fused+graph pool {fused_mb:.0f} MiB")
    except Exception as err:  # report, do not hide the fused result
        notes.append(f"fused+graph not captured: {type(err).__name__}: {str(err)[:200]}")
    variants["eager_loop"] = eager_loop
    variants["fused_per_level"] = fused_per_level

    counts = [per_level] * len(pool.levels)
    result = nk_bench.compare(
        f"heads_fwd_bwd[{heads}]",
        {"heads": heads, "per_level": per_level, "batch": BATCH, "hidden": HIDDEN, "dtype": "bfloat16",
         "kind": "global", "features": "SDXL 1024^2 (10 levels)"},
        variants, flops=head_flops(pool.levels, counts, HIDDEN, BATCH), dtype=DTYPE, memory=True,
        notes="; ".join(notes), warmup=3, reps=10 if heads == 160 else 20)
    print(f"\n{result.name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in result.ms.items())
          + f"; floor {result.floor_ms:.2f} ms, fused reaches {100 * result.fraction_of_floor:.0f}%; peak MiB "
          + ", ".join(f"{k} {v:.0f}" for k, v in result.peak_mb.items()) + f"; {result.notes}")
