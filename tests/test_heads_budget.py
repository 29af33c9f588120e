"""Host-side budget of one HeadPool forward + backward at the SDXL level layout (10 levels, depths 5/4/3):
Triton launches, aten ops and sparse COO constructions, counted without running a kernel.

The host code runs for real (ops.heads + kernels.heads, Triton backend) on small-channel CPU tensors of the SDXL
map sizes; every Triton launch (kernel[grid](...)) is recorded instead of run, and a dispatch mode
counts each aten op, the custom ops' insides included. The counts do not depend on the channel widths or the
batch; they depend on the number of levels, their depths and the per-level head counts.

Measured with the kernels of issue 14's start (ops.head_levels, `pool` weights), the same at 1, 4 and 16 heads
per level: 11 forward + 21 backward = 32 Triton launches (the README's and the issue's count); 195 aten ops in
the forward and 1893 in the backward (2088; the issue's "~384" counted fewer kinds), of which 176 sparse COO
constructions: one per pooled parameter (39 conv layers x 4 + 10 x 2 final), each with its index/values views,
detach and clone as autograd accumulates it into .grad (~10 aten ops per pooled parameter: the bulk of the
backward). The CPU path also checks the ids per level with min/max/item (20 host reads; on a GPU that check is
one device-side assert). After the GEMM-layout rewrite (e40cc72: normalise+SiLU materialised once per layer):
15 + 25 = 40 launches, 302 + 2029 aten ops, 176 sparse COO. The budgets below are what the committed code meets,
rounded up a little. Hoisted hot-loop index math (issue 14): the layer-1 feature gradient is written channels-last
and copied into an NCHW feature's layout (+2 aten ops per level, 2049: a coalesced copy instead of a strided
scatter from the kernel). A regression (a per-level or per-head launch, a copy per layer) fails them. Lower them as
the host code improves.
"""
from __future__ import annotations

import collections
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nitrokernels.nn.head_pool import SDXL_LEVELS, HeadPool
from nitrokernels.ops.dispatch import use_backend

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton backend runs CPU tensors only under TRITON_INTERPRET=1")

# (forward launches, backward launches, aten ops forward + backward, sparse COO constructions): upper bounds
BUDGET = {"launches_forward": 15, "launches_backward": 25, "aten_forward": 310, "aten_backward": 2055,
          "sparse_coo": 176}
SPARSE_OPS = ("_sparse_coo_tensor_with_dims_and_tensors", "sparse_coo_tensor", "_coalesce")


class _CountAten(TorchDispatchMode):
    """Counts every aten op; a custom op (nitrokernels::*) is run through its Python implementation with the
    mode still on, so what it does inside is counted too."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith("nitrokernels::"):
            from torch._library.custom_ops import OPDEFS

            opdef = OPDEFS[func._schema.name]
            with self:
                return opdef._init_fn(*args, **kwargs)
        self.counts[name.split("::")[-1].split(".")[0]] += 1
        return func(*args, **kwargs)


def _recorded_launches(monkeypatch):
    """kernel[grid](...) records the kernel's name and runs nothing (JIT or interpreter kernel classes)."""
    import nitrokernels.kernels.heads as kernels

    launched = []
    cls = type(kernels._conv_fwd_kernel)

    def record(self, grid):
        name = getattr(self, "fn", self).__name__
        return lambda *args, **kwargs: launched.append(name)
    monkeypatch.setattr(cls, "__getitem__", record)
    return launched


def measure(monkeypatch, per_level: int, channels_scale: int = 32) -> dict:
    """Counts of one forward + backward (gradients to the features and the pooled parameters)."""
    levels = tuple((max(c // channels_scale, 4), s) for c, s in SDXL_LEVELS)
    pool = HeadPool(levels, heads_per_level=max(per_level, 1), hidden=8, num_groups=4)
    features = [torch.randn(1, c, s, s, requires_grad=True) for c, s in pool.levels]
    ids = pool.sample(per_level, generator=torch.Generator().manual_seed(0))
    launched = _recorded_launches(monkeypatch)
    with use_backend("triton", "head_stack"):
        with _CountAten() as fwd_mode:
            out = pool(features, ids)
        n_fwd = len(launched)
        with _CountAten() as bwd_mode:
            torch.autograd.backward(out, torch.ones_like(out))
    aten = fwd_mode.counts + bwd_mode.counts
    return {"launches_forward": n_fwd, "launches_backward": len(launched) - n_fwd,
            "aten_forward": sum(fwd_mode.counts.values()), "aten_backward": sum(bwd_mode.counts.values()),
            "aten_ops": sum(aten.values()), "sparse_coo": sum(aten[k] for k in SPARSE_OPS), "by_op": aten}


@pytest.mark.parametrize("per_level", [1, 4])
def test_heads_forward_backward_host_budget(monkeypatch, per_level):
    m = measure(monkeypatch, per_level)
    report = {k: v for k, v in m.items() if k != "by_op"}
    print(f"\nheads fwd+bwd, {per_level} per level:", report, dict(m["by_op"].most_common(12)))
    for key, limit in BUDGET.items():
        assert m[key] <= limit, f"{key}: {m[key]} > budget {limit}  ({report}; most common: " \
                                f"{m['by_op'].most_common(8)})"
    assert m["launches_forward"] > 0 and m["launches_backward"] > 0      # the recording reached the kernels


def test_the_budget_catches_a_per_level_launch(monkeypatch):
    """What a regression looks like: one extra launch and a copy per level in the forward."""
    import nitrokernels.kernels.heads as kernels

    forward = kernels.levels_forward

    def per_level_extra(features, *args, **kwargs):
        for f in features:
            f.contiguous(memory_format=torch.channels_last).clone()
            kernels._conv_fwd_kernel[(1,)](f)
        return forward(features, *args, **kwargs)
    monkeypatch.setattr(kernels, "levels_forward", per_level_extra)
    m = measure(monkeypatch, 1)
    assert m["launches_forward"] > BUDGET["launches_forward"]
    assert m["aten_forward"] > BUDGET["aten_forward"]
