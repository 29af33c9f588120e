"""nitrokernels.ops.head_stack (triton under the interpreter on CPU, and eager) vs the float64 per-head loop.

Every test builds fresh random pools; gradients of the pooled parameters are SPARSE COO tensors whose
rows are the sampled ids: they are densified and compared with the loop reference's dense gradients, and
their row sets are checked (unsampled heads have no entries).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import nitrokernels.kernels.heads as head_kernels
from nitrokernels.ops import reference
from nitrokernels.ops.dispatch import BackendUnavailable, use_backend
from nitrokernels.ops.heads import HEAD_STACK, head_levels, head_stack
from nitrokernels.testing import assert_close_to_reference, assert_graph_capturable, non_contiguous

HAS_CUDA = torch.cuda.is_available()


# ============================================================================================ helpers
def make_pool(pool, channels, size, hidden, depth, k, batch, *, dtype=torch.float32, device="cpu"):
    """Feature [B, C, S, S] and pooled head parameters initialised roughly like torch's layers."""
    def uniform(shape, bound):
        return ((torch.rand(shape) * 2 - 1) * bound).to(device=device, dtype=dtype)

    feature = torch.randn(batch, channels, size, size).to(device=device, dtype=dtype)
    conv_w, conv_b, norm_w, norm_b = [], [], [], []
    c_in = channels
    for _ in range(depth):
        bound = (c_in * 16) ** -0.5
        conv_w.append(uniform((pool, hidden, c_in, 4, 4), bound))
        conv_b.append(uniform((pool, hidden), bound))
        norm_w.append((1 + 0.3 * torch.randn(pool, hidden)).to(device=device, dtype=dtype))
        norm_b.append((0.3 * torch.randn(pool, hidden)).to(device=device, dtype=dtype))
        c_in = hidden
    bound = (hidden * k * k) ** -0.5
    return feature, conv_w, conv_b, norm_w, norm_b, uniform((pool, 1, hidden, k, k), bound), uniform((pool, 1), bound)


def flat(args):
    feature, conv_w, conv_b, norm_w, norm_b, final_w, final_b = args
    return [feature, *conv_w, *conv_b, *norm_w, *norm_b, final_w, final_b]


def param_names(depth):
    names = ["feature"]
    for kind in ("conv_weights", "conv_biases", "norm_weights", "norm_biases"):
        names += [f"{kind}[{d}]" for d in range(depth)]
    return names + ["final_weight", "final_bias"]


def leaves(args, dtype=None, requires_grad=True):
    def conv(t):
        t = t.detach().to(dtype) if dtype is not None else t.detach().clone()
        return t.requires_grad_(requires_grad)
    feature, conv_w, conv_b, norm_w, norm_b, final_w, final_b = args
    return (conv(feature), [conv(t) for t in conv_w], [conv(t) for t in conv_b], [conv(t) for t in norm_w],
            [conv(t) for t in norm_b], conv(final_w), conv(final_b))


def run_op(args, ids, groups, grad_out, backend=None):
    """(logits, [gradients in `flat` order]) of head_stack with `backend` forced (None: dispatch)."""
    def go():
        out = head_stack(*args, ids, groups)
        return out, torch.autograd.grad(out, flat(args), grad_out.to(out.dtype))
    if backend is None:
        return go()
    with use_backend(backend, "head_stack"):
        return go()


def run_loop(args, ids, groups, grad_out):
    out = reference.head_stack_loop_reference(*args, ids, groups)
    return out, torch.autograd.grad(out, flat(args), grad_out.to(out.dtype))


def dense(g):
    return g.to_dense() if g.is_sparse else g


def check_sparse_rows(grads, ids, depth):
    """Pooled-parameter gradients are sparse COO with exactly the sampled rows (call order, uncoalesced)."""
    for name, g in zip(param_names(depth)[1:], grads[1:]):
        assert g.is_sparse, f"{name}: expected a sparse COO gradient, got {g.layout}"
        assert g._indices()[0].tolist() == ids.tolist(), f"{name}: rows {g._indices()[0].tolist()} != ids"
        assert set(g.coalesce().indices()[0].tolist()) == set(ids.tolist())


def ulp_floor(reference_value, dtype):
    """One unit in the last place of `dtype` at the reference's largest magnitude: the absolute floor of the
    low-precision checks. (These tensors are small, so their max error is a noisy statistic; rounding the
    largest element alone costs half an ulp, and the default 1e-3 * scale is below that for bfloat16.)"""
    return torch.finfo(dtype).eps * reference_value.detach().abs().max().item()


def grad_out_for(ids, batch, size, depth, k, dtype=torch.float64, device="cpu"):
    s = size >> depth
    shape = (len(ids), batch) if k != 1 else (len(ids), batch, s, s)
    return torch.randn(shape).to(device=device, dtype=dtype)


# (name, C, S, hidden, groups, depth, k, batch, pool, ids): odd channel counts, sizes 8-32, batch 1-3,
# 1 to 12 heads, repeated and unordered ids, global (k=4) and local (k=1) heads.
CASES = [
    ("global-1layer", 5, 8, 24, 4, 1, 4, 2, 6, [3, 0, 3, 5]),
    ("local-2layers", 7, 16, 32, 8, 2, 1, 3, 9, [8, 1, 4, 1, 0]),
    ("local-size24", 6, 24, 16, 4, 2, 1, 1, 4, [2, 3]),
    ("global-3layers", 3, 32, 16, 2, 3, 4, 2, 3, [1]),
    ("global-odd-size9", 5, 9, 16, 4, 1, 4, 2, 5, [4, 2]),
    ("local-12heads", 4, 8, 16, 4, 1, 1, 1, 12, [11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0]),
]


# ================================================================================== fp32 vs float64
@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_loop_reference_fp32(backend, case):
    _, channels, size, hidden, groups, depth, k, batch, pool, ids = case
    ids = torch.tensor(ids)
    args = make_pool(pool, channels, size, hidden, depth, k, batch)
    grad_out = grad_out_for(ids, batch, size, depth, k)
    ref_out, ref_grads = run_loop(leaves(args, torch.float64), ids, groups, grad_out)
    out, grads = run_op(leaves(args), ids, groups, grad_out, backend)
    assert out.dtype == torch.float32
    assert_close_to_reference(out, ref_out, name="logits")
    check_sparse_rows(grads, ids, depth)
    for name, g, r in zip(param_names(depth), grads, ref_grads):
        assert_close_to_reference(dense(g), r, name=f"grad {name}")


SMALL_BLOCKS = dict(fwd_m=16, fwd_n=16, fwd_kc=16, fin_p=16, fin_c=16, dg_m=16, dg_n=16, dg_m_epi=16, dg_n_epi=16, dg_ko=16,
                    wg_m=16,
                    wg_n=16, wg_k=16, ew_q=16, ew_c=16)


def _check_triton_vs_loop(args, ids, groups, depth, k):
    batch, size = args[0].shape[0], args[0].shape[-1]
    grad_out = grad_out_for(ids, batch, size, depth, k)
    ref_out, ref_grads = run_loop(leaves(args, torch.float64), ids, groups, grad_out)
    out, grads = run_op(leaves(args), ids, groups, grad_out, "triton")
    assert_close_to_reference(out, ref_out, name="logits")
    for name, g, r in zip(param_names(depth), grads, ref_grads):
        assert_close_to_reference(dense(g), r, name=f"grad {name}")


def test_multi_tile_paths(monkeypatch):
    """Small blocks: several row tiles per sample (GroupNorm partials combined), several channel chunks
    (K loops), several dgrad tiles per parity class (odd 5x5 class grid), several final-conv tiles."""
    monkeypatch.setattr(head_kernels, "BLOCK_OVERRIDE", SMALL_BLOCKS)
    _check_triton_vs_loop(make_pool(2, 17, 20, 20, 2, 1, 1), torch.tensor([1]), 5, 2, 1)


def test_gpu_grid_layout_under_interpreter(monkeypatch):
    """One tap per wgrad program and one parity class per dgrad program, as on the GPU."""
    monkeypatch.setattr(head_kernels, "BLOCK_OVERRIDE", dict(SMALL_BLOCKS, dg_classes=1, wg_taps=1))
    _check_triton_vs_loop(make_pool(2, 4, 8, 16, 1, 4, 1), torch.tensor([1]), 4, 1, 4)


@pytest.mark.parametrize("programs", [1, 2, 10 ** 6], ids=["one-program", "two-programs", "one-tile-each"])
def test_persistent_programs_take_every_tile_once(poisoned, monkeypatch, programs):
    """The GEMM kernels are persistent: a grid of `programs` walks the compacted tile list with its stride. One
    program doing every tile, two interleaving, and one tile per program all give the loop's numbers (a skipped
    or repeated tile leaves a poisoned or doubled output / gradient)."""
    monkeypatch.setattr(head_kernels, "BLOCK_OVERRIDE", dict(SMALL_BLOCKS, dg_classes=1, wg_taps=1, programs=programs))
    _check_triton_vs_loop(make_pool(2, 4, 8, 16, 2, 2, 2), torch.tensor([1, 0]), 4, 2, 4)


def test_persistent_grid_is_the_resident_programs_of_the_compiled_kernel(monkeypatch):
    """On a GPU the grid is SMs x the programs per SM that the compiled variant's registers, shared memory and
    warps allow (recorded at its first launch, which has one program per tile), never more than the tiles."""
    from types import SimpleNamespace

    props = SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                            shared_memory_per_multiprocessor=233472)
    monkeypatch.setattr(head_kernels, "triton_interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(head_kernels, "_RESIDENT", {})

    def fake_kernel(name, warps, regs, shared):
        grids = []

        class Kernel:
            __name__ = name

            def __getitem__(self, grid):
                grids.append(grid)
                return lambda *a, **k: SimpleNamespace(n_regs=regs, metadata=SimpleNamespace(num_warps=warps,
                                                                                             shared=shared))
        return Kernel(), grids

    big, big_grids = fake_kernel("layer1", 8, 254, 196608)    # 1 per SM (registers and shared memory)
    small, small_grids = fake_kernel("deeper", 4, 128, 40960)  # 4 per SM (registers: 4 x 16384)
    for _ in range(2):
        head_kernels._persistent(big, 1000, "cuda", BM=128)
        head_kernels._persistent(small, 1000, "cuda", BM=64)
        head_kernels._persistent(small, 100, "cuda", BM=64)
    assert big_grids == [(1000,), (132,)]
    assert small_grids == [(1000,), (100,), (528,), (100,)]
    head_kernels._persistent(small, 1000, "cuda", BM=32)       # another variant: measured anew
    assert small_grids[-1] == (1000,)


# (channels, size, hidden, depth, batch): K steps of 16 pixels carried across rows (16x16 -> 8x8 maps) and samples
# (batch 2), channels a multiple of 16 but not of the data-gradient column block (48 vs 32: wrapped weight
# columns); and carried across columns (64x64 -> 32x32 maps: 32-pixel rows, two K steps each).
HOISTED_CASES = [(48, 32, 48, 2, 2), (16, 64, 16, 1, 2)]


@pytest.mark.parametrize("case", HOISTED_CASES, ids=["rows-samples-wrapped-columns", "columns"])
def test_hoisted_index_paths(monkeypatch, case):
    """The hot loops' hoisted index math at power-of-two sizes (as on the GPU)."""
    channels, size, hidden, depth, batch = case
    monkeypatch.setattr(head_kernels, "BLOCK_OVERRIDE", dict(SMALL_BLOCKS, dg_n=32, dg_n_epi=32, wg_n=32,
                                                             dg_classes=1, wg_taps=1))
    _check_triton_vs_loop(make_pool(2, channels, size, hidden, depth, 1, batch), torch.tensor([1, 0]), 4, depth, 1)


def gemm_storage(w):
    """A [P, O, I, 4, 4] conv weight re-stored in the kernels' GEMM layout [P, 4, 4, I, O] (HeadPool's parameters):
    (the [P, 4, 4, I, O] leaf, its [P, O, I, 4, 4] view)."""
    leaf = w.detach().permute(0, 3, 4, 2, 1).contiguous().requires_grad_(True)
    return leaf, leaf.permute(0, 4, 3, 1, 2)


def test_gemm_layout_weights_are_read_in_place(poisoned, monkeypatch):
    """Conv weights given as [P, O, I, 4, 4] views of [P, 4, 4, I, O] storage (how HeadPool passes them) are read
    where they are (no conversion copy), and their sparse gradients reach the storage leaves with contiguous
    [h, 4, 4, I, O] values; plain [P, O, I, 4, 4] weights (converted per call) give the same numbers."""
    args = make_pool(5, 6, 16, 16, 2, 1, 2)
    ids = torch.tensor([4, 0, 4])
    grad_out = grad_out_for(ids, 2, 16, 2, 1)
    ref_out, ref_grads = run_loop(leaves(args, torch.float64), ids, 4, grad_out)
    ops = leaves(args)
    stored = [gemm_storage(w) for w in ops[1]]
    seen = []
    convert = head_kernels._gemm_weights

    def spy(conv_weights, d, lv):
        out = convert(conv_weights, d, lv)
        seen.extend(t.data_ptr() == conv_weights[l][d].data_ptr() for t, l in zip(out, lv))
        return out
    monkeypatch.setattr(head_kernels, "_gemm_weights", spy)
    ops = (ops[0], [v for _, v in stored], *ops[2:])
    with use_backend("triton", "head_stack"):
        out = head_stack(*ops, ids, 4)
        grads = torch.autograd.grad(out, [ops[0], *(leaf for leaf, _ in stored), *flat(ops)[3:]], grad_out.float())
    assert seen and all(seen), "GEMM-layout weights were copied"
    assert_close_to_reference(out, ref_out, name="logits")
    assert_close_to_reference(grads[0], ref_grads[0], name="grad feature")
    for d, (g, r) in enumerate(zip(grads[1:3], ref_grads[1:3])):
        assert g.is_sparse and g.shape == stored[d][0].shape and g._values().is_contiguous()
        assert g._indices()[0].tolist() == ids.tolist()
        assert_close_to_reference(dense(g).permute(0, 4, 3, 1, 2), r, name=f"grad conv_weights[{d}]")
    for name, g, r in zip(param_names(2)[3:], grads[3:], ref_grads[3:]):
        assert_close_to_reference(dense(g), r, name=f"grad {name}")
    assert not hasattr(head_kernels, "weight_source")      # no weight-source choice any more


# ===================================================================================== low precision
LOW_PRECISION_CASES = [CASES[0], ("local-2layers", 7, 16, 32, 8, 2, 1, 2, 9, [8, 1, 1])]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=[c[0] for c in LOW_PRECISION_CASES])
def test_low_precision_within_twice_eager_error(dtype, backend, case):
    _, channels, size, hidden, groups, depth, k, batch, pool, ids = case
    ids = torch.tensor(ids)
    args = make_pool(pool, channels, size, hidden, depth, k, batch)
    grad_out = grad_out_for(ids, batch, size, depth, k)
    ref_out, ref_grads = run_loop(leaves(args, torch.float64), ids, groups, grad_out)
    eager_out, eager_grads = run_loop(leaves(args, dtype), ids, groups, grad_out)    # eager loop in `dtype`
    out, grads = run_op(leaves(args, dtype), ids, groups, grad_out, backend)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    # The eager backend is torch's own batched kernels (other reduction orders than the loop): factor 4.
    factor = 2.0 if backend == "triton" else 4.0
    for name, g, e, r in zip(["logits"] + param_names(depth), [out, *grads], [eager_out, *eager_grads],
                             [ref_out, *ref_grads]):
        assert_close_to_reference(dense(g), r, e, factor=factor, atol=ulp_floor(r, dtype), name=name)


# ============================================================================= layouts, ids, subsets
@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_feature_layouts(layout):
    ids = torch.tensor([2, 0])
    args = make_pool(3, 6, 16, 16, 2, 1, 2)
    grad_out = grad_out_for(ids, 2, 16, 2, 1)
    ref_out, ref_grads = run_loop(leaves(args, torch.float64), ids, 4, grad_out)
    op_args = leaves(args)
    feature = op_args[0].detach()
    feature = (feature.to(memory_format=torch.channels_last) if layout == "channels_last"
               else non_contiguous(feature)).requires_grad_(True)
    op_args = (feature,) + op_args[1:]
    out, grads = run_op(op_args, ids, 4, grad_out, "triton")
    assert_close_to_reference(out, ref_out, name="logits")
    assert_close_to_reference(grads[0], ref_grads[0], name="grad feature")
    if layout == "channels_last":
        assert grads[0].stride() == torch.empty_like(feature).stride()
    assert_close_to_reference(dense(grads[1]), ref_grads[1], name="grad conv_weights[0]")


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_int32_ids_and_backends_agree(backend):
    args = make_pool(5, 5, 8, 16, 1, 4, 2)
    ids64 = torch.tensor([4, 1, 4])
    with torch.no_grad(), use_backend(backend, "head_stack"):
        a = head_stack(*args, ids64, 4)
        b = head_stack(*args, ids64.int(), 4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_strided_ids(backend):
    """ids may be any 1-D view (HeadPool.sample(1) gives a stride-2 one): same result as contiguous ids."""
    args = make_pool(5, 5, 8, 16, 1, 4, 2)
    strided = torch.tensor([[4, 0], [1, 0], [3, 0]])[:, 0]
    assert not strided.is_contiguous()
    with torch.no_grad(), use_backend(backend, "head_stack"):
        a = head_stack(*args, strided, 4)
        b = head_stack(*args, strided.contiguous(), 4)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_autocast_does_not_reach_inside(backend):
    """Under torch.autocast the op still computes in its inputs' dtype: same logits and gradients as without."""
    args = leaves(make_pool(5, 6, 8, 16, 1, 4, 2))
    ids = torch.tensor([3, 0, 3])
    grad_out = torch.randn(3, 2)
    plain_out, plain_grads = run_op(args, ids, 4, grad_out, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run_op(args, ids, 4, grad_out, backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    for g, r in zip(grads, plain_grads):
        torch.testing.assert_close(dense(g), dense(r), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_gradient_subsets(backend):
    """Only the feature, or only the parameters, require grad: the other side gets None."""
    ids = torch.tensor([1, 2])
    args = make_pool(3, 5, 8, 16, 1, 4, 2)
    grad_out = grad_out_for(ids, 2, 8, 1, 4, torch.float32)
    ref = run_loop(leaves(args, torch.float64), ids, 4, grad_out)[1]
    feat_only = (leaves(args)[0],) + leaves(args, requires_grad=False)[1:]
    params_only = (leaves(args, requires_grad=False)[0],) + leaves(args)[1:]
    with use_backend(backend, "head_stack"):
        out = head_stack(*feat_only, ids, 4)
        (g,) = torch.autograd.grad(out, [feat_only[0]], grad_out)
        assert_close_to_reference(g, ref[0], name="grad feature")
        out = head_stack(*params_only, ids, 4)
        out.backward(grad_out)
    assert params_only[0].grad is None
    for name, p, r in zip(param_names(1)[1:], flat(params_only)[1:], ref[1:]):
        assert p.grad is not None and p.grad.is_sparse, name
        assert_close_to_reference(p.grad.to_dense(), r, name=f"grad {name}")


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_sparse_gradients_accumulate_across_backward_calls(backend):
    """register_autograd may return a sparse COO gradient for a dense parameter, and autograd accumulates it
    into param.grad over two backward calls (the gradient-accumulation pattern of the trainer)."""
    args = leaves(make_pool(6, 5, 8, 16, 1, 4, 2))
    first, second = torch.tensor([0, 3]), torch.tensor([3, 5, 5])
    go = torch.randn(2, 2), torch.randn(3, 2)
    with use_backend(backend, "head_stack"):
        head_stack(*args, first, 4).backward(go[0])
        head_stack(*args, second, 4).backward(go[1])
    ref_args = leaves(args, torch.float64)
    (reference.head_stack_loop_reference(*ref_args, first, 4) * go[0].double()).sum().backward()
    (reference.head_stack_loop_reference(*ref_args, second, 4) * go[1].double()).sum().backward()
    for name, p, r in zip(param_names(1)[1:], flat(args)[1:], flat(ref_args)[1:]):
        assert p.grad.is_sparse, name
        assert set(p.grad.coalesce().indices()[0].tolist()) == {0, 3, 5}, name
        assert_close_to_reference(p.grad.to_dense(), r.grad, name=f"accumulated grad {name}")
    assert_close_to_reference(args[0].grad, ref_args[0].grad, name="accumulated grad feature")


def test_no_heads():
    args = leaves(make_pool(3, 5, 8, 16, 1, 4, 2))
    out = head_stack(*args, torch.zeros(0, dtype=torch.long), 4)
    assert out.shape == (0, 2)
    out.sum().backward()
    assert args[1][0].grad.is_sparse and args[1][0].grad._nnz() == 0


# ============================================================================================ errors
def _good():
    return make_pool(4, 5, 8, 16, 1, 4, 2)


def _call(args, ids=None, groups=4):
    return head_stack(*args, torch.tensor([0, 3]) if ids is None else ids, groups)


def _with(args, index, value):
    args = list(args)
    args[index] = value
    return tuple(args)


@pytest.mark.parametrize("bad, error, match", [
    (lambda a: _call(a, torch.tensor([0, 4])), IndexError, r"ids must lie in \[0, 4\)"),
    (lambda a: _call(a, torch.tensor([-1])), IndexError, r"ids must lie in \[0, 4\)"),
    (lambda a: _call(a, torch.tensor([0.0, 1.0])), TypeError, "int64"),
    (lambda a: _call(a, torch.tensor([[0, 1]])), ValueError, "1-D"),
    (lambda a: _call(_with(a, 0, a[0][:, :4])), ValueError, r"conv_weights\[0\] must be \[P=4, O, 4, 4, 4\]"),
    (lambda a: _call(_with(a, 0, a[0][..., :7])), ValueError, "square"),
    (lambda a: _call(_with(a, 0, torch.randn(2, 5, 16, 16))), ValueError, "reduce the 16x16 feature to 8x8"),
    (lambda a: _call(a, groups=5), ValueError, "num_groups=5 does not divide"),
    (lambda a: _call(_with(a, 5, a[5].half())), TypeError, "final_weight is torch.float16"),
    (lambda a: _call(_with(a, 2, [])), ValueError, "conv_biases has 0 tensors"),
    (lambda a: _call(_with(a, 6, a[6][:3])), ValueError, r"final_bias must be \[4, 1\]"),
    (lambda a: _call(_with(a, 3, [a[3][0][:, :8]])), ValueError, r"norm_weights\[0\] must be \[4, 16\]"),
    (lambda a: _call(_with(a, 0, a[0].int())), TypeError, "feature dtype"),
    (lambda a: _call(_with(a, 0, a[0].to("meta"))), ValueError, "ids are on cpu but the feature is on meta"),
])
def test_bad_input_raises_clear_error_before_any_kernel(monkeypatch, bad, error, match):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")
    monkeypatch.setattr(head_kernels, "levels_forward", no_kernel)
    with pytest.raises(error, match=match):
        bad(_good())


def test_triton_declines_float64_and_says_why():
    args = make_pool(3, 5, 8, 16, 1, 4, 1, dtype=torch.float64)
    ids = torch.tensor([0])
    reasons = HEAD_STACK.explain(*args, ids, 4)
    assert any("float64" in r for r in reasons["triton"])
    with pytest.raises(BackendUnavailable, match="float64"), use_backend("triton", "head_stack"):
        head_stack(*args, ids, 4)
    out = head_stack(*args, ids, 4)               # dispatch falls back to eager
    torch.testing.assert_close(out, reference.head_stack_loop_reference(*args, ids, 4))


# ====================================================================================== multi-level
# (channels, size, depth, pool, ids) per level: mixed channels, sizes and depths (all end at 4x4), a level
# with no sampled head, repeated and unordered ids; hidden 16, 4 groups, batch 1 (the interpreter is slow).
LEVELS = [(5, 16, 2, 4, [3, 0, 3]), (3, 8, 1, 3, []), (6, 32, 3, 2, [1]), (4, 8, 1, 5, [4, 2, 0])]


def make_levels(k, levels=LEVELS, hidden=16, batch=1):
    """Per-level (feature, params...) tuples, the concatenated ids and the counts."""
    args = [make_pool(pool, c, s, hidden, depth, k, batch) for c, s, depth, pool, _ in levels]
    ids = torch.tensor([i for *_, lv_ids in levels for i in lv_ids], dtype=torch.long)
    return args, ids, [len(lv[-1]) for lv in levels]


def run_levels(per_level, ids, counts, grad_out, backend, row_offsets=None):
    """(logits, [flat gradients of every level]) of ONE head_levels call."""
    lists = [[a[i] for a in per_level] for i in range(7)]
    with use_backend(backend, "head_stack"):
        out = head_levels(*lists, ids, counts, row_offsets, num_groups=4)
        leaves_ = [t for a in per_level for t in flat(a)]
        grads = torch.autograd.grad(out, leaves_, grad_out.to(out.dtype), allow_unused=True)
    return out, grads


def run_per_level(per_level, ids, counts, grad_out, fn):
    """The same with one call per level: fn(level args, level ids) -> logits (head_stack or the loop)."""
    outs, start = [], 0
    for a, c in zip(per_level, counts):
        if c:
            outs.append(fn(a, ids[start:start + c]))
        start += c
    out = torch.cat(outs)
    leaves_ = [t for a in per_level for t in flat(a)]
    return out, torch.autograd.grad(out, leaves_, grad_out.to(out.dtype), allow_unused=True)


def loop_fn(a, ids):
    return reference.head_stack_loop_reference(*a, ids, 4)


def level_grad_out(k, counts, batch=1, dtype=torch.float64):
    total = sum(counts)
    return torch.randn((total, batch) if k != 1 else (total, batch, 4, 4)).to(dtype)


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty / empty_like return NaN-filled float tensors while the op runs: any element a kernel fails
    to write (an inactive program of a smaller level, a wrong per-level offset) shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def _check_levels(per_level, ids, counts, grad_out, got, name):
    ref_out, ref_grads = run_per_level([leaves(a, torch.float64) for a in per_level], ids, counts, grad_out, loop_fn)
    out, grads = got
    assert_close_to_reference(out, ref_out, name=f"{name} logits")
    names = [f"level {l} {n}" for l, a in enumerate(per_level) for n in param_names(len(a[1]))]
    level_of = [l for l, a in enumerate(per_level) for _ in flat(a)]
    for n, g, r, l in zip(names, grads, ref_grads, level_of):
        if counts[l] == 0:     # no sampled head: no feature gradient, empty sparse parameter gradients
            assert g is None or (g.is_sparse and g._nnz() == 0), n
            continue
        assert_close_to_reference(dense(g), r, name=f"{name} grad {n}")


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("k", [4, 1], ids=["global", "local"])
def test_levels_match_loop_and_per_level_fp32(poisoned, backend, k):
    """ONE head_levels call == the loop reference per level (float64) == one head_stack call per level."""
    per_level, ids, counts = make_levels(k)
    grad_out = level_grad_out(k, counts)
    got = run_levels([leaves(a) for a in per_level], ids, counts, grad_out, backend)
    _check_levels(per_level, ids, counts, grad_out, got, backend)
    if k == 1:
        return          # (one comparison with per-level calls is enough; the interpreter is slow)
    with use_backend(backend, "head_stack"):
        per = run_per_level([leaves(a) for a in per_level], ids, counts, grad_out, lambda a, i: head_stack(*a, i, 4))
    torch.testing.assert_close(got[0], per[0], rtol=1e-5, atol=1e-6)
    for g, p in zip(got[1], per[1]):
        if p is not None:
            torch.testing.assert_close(dense(g), dense(p), rtol=1e-5, atol=1e-6)


def test_levels_sparse_rows_and_row_offsets():
    """ids offset per level (row_offsets, as HeadPool passes global head ids): the same values, and every
    pooled parameter's gradient is sparse with exactly its level's rows in call order."""
    per_level, ids, counts = make_levels(4)
    offsets = [0, 7, 100, 3]
    shifted = torch.cat([ids[sum(counts[:l]):sum(counts[:l + 1])] + offsets[l] for l in range(len(counts))])
    grad_out = level_grad_out(4, counts)
    got = run_levels([leaves(a) for a in per_level], shifted, counts, grad_out, "triton", offsets)
    _check_levels(per_level, ids, counts, grad_out, got, "offsets")
    lists = [[a[i].double() if i in (0, 5, 6) else [t.double() for t in a[i]] for a in per_level] for i in range(7)]
    ref = reference.head_levels_loop_reference(*lists, shifted, counts, offsets, num_groups=4)
    assert_close_to_reference(got[0], ref, name="vs head_levels_loop_reference")
    i, start = 0, 0
    for a, c in zip(per_level, counts):
        n = len(flat(a))
        rows = ids[start:start + c]
        for g in got[1][i + 1:i + n]:
            assert g.is_sparse and g._indices()[0].tolist() == rows.tolist()
        i, start = i + n, start + c


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_levels_low_precision_within_twice_eager_error(dtype):
    levels = [(5, 16, 2, 4, [3, 0]), LEVELS[3]]
    per_level, ids, counts = make_levels(4, levels)
    grad_out = level_grad_out(4, counts)
    ref_out, ref_grads = run_per_level([leaves(a, torch.float64) for a in per_level], ids, counts, grad_out, loop_fn)
    eager = run_per_level([leaves(a, dtype) for a in per_level], ids, counts, grad_out, loop_fn)
    out, grads = run_levels([leaves(a, dtype) for a in per_level], ids, counts, grad_out, "triton")
    assert out.dtype == dtype
    for name, g, e, r in zip(range(1000), [out, *grads], [eager[0], *eager[1]], [ref_out, *ref_grads]):
        assert_close_to_reference(dense(g), r, e, atol=ulp_floor(r, dtype), name=f"output {name}")


def test_levels_feature_layouts_and_small_blocks(poisoned, monkeypatch):
    """Channels-last and non-contiguous features in one call; small blocks: several tiles per level, and
    levels with fewer tiles / channel blocks than the launch's largest (inactive programs)."""
    monkeypatch.setattr(head_kernels, "BLOCK_OVERRIDE", dict(SMALL_BLOCKS, dg_classes=1, wg_taps=4))
    levels = [(5, 16, 2, 2, [1, 0]), (20, 8, 1, 2, [1])]
    per_level, ids, counts = make_levels(4, levels)
    grad_out = level_grad_out(4, counts)
    ops = [leaves(a) for a in per_level]
    feats = [ops[0][0].detach().to(memory_format=torch.channels_last), non_contiguous(ops[1][0].detach())]
    ops = [(f.requires_grad_(True),) + a[1:] for f, a in zip(feats, ops)]
    got = run_levels(ops, ids, counts, grad_out, "triton")
    _check_levels(per_level, ids, counts, grad_out, got, "layouts")
    assert got[1][0].stride() == torch.empty_like(feats[0]).stride()     # the feature's own layout


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_levels_feature_grad_of_some_levels_only(poisoned, backend):
    """Only level 1's feature requires grad, no parameter does: that level's feature gradient alone, from the
    layer-1 data gradient restricted to the levels that need it (and no parameter-gradient kernels)."""
    levels = [(5, 16, 2, 3, [2, 0]), (4, 8, 1, 2, [1, 1])]
    per_level, ids, counts = make_levels(4, levels)
    grad_out = level_grad_out(4, counts)
    ref_out, ref_grads = run_per_level([leaves(a, torch.float64) for a in per_level], ids, counts, grad_out, loop_fn)
    ops = [leaves(a, requires_grad=False) for a in per_level]
    ops[1] = (ops[1][0].detach().requires_grad_(True),) + ops[1][1:]
    lists = [[a[i] for a in ops] for i in range(7)]
    with use_backend(backend, "head_stack"):
        out = head_levels(*lists, ids, counts, num_groups=4)
        (g,) = torch.autograd.grad(out, [ops[1][0]], grad_out.to(out.dtype))
    assert_close_to_reference(out, ref_out, name="logits")
    assert_close_to_reference(g, ref_grads[len(flat(per_level[0]))], name="grad feature of level 1")


def _bad_levels(change):
    per_level, ids, counts = make_levels(4, [(5, 16, 2, 3, [2, 0]), (4, 8, 1, 2, [1])])
    lists = [[a[i] for a in per_level] for i in range(7)]
    kwargs = dict(ids=ids, counts=counts, row_offsets=None)
    change(lists, kwargs)
    return lambda: head_levels(*lists, kwargs["ids"], kwargs["counts"], kwargs["row_offsets"], num_groups=4)


def _swap_level(lists, level, other):
    for i in range(7):
        lists[i][level] = other[i]


@pytest.mark.parametrize("change, error, match", [
    (lambda l, k: k.update(counts=[2, 2]), ValueError, "counts"),
    (lambda l, k: _swap_level(l, 1, make_pool(2, 4, 8, 32, 1, 4, 1)), ValueError, "same width"),
    (lambda l, k: _swap_level(l, 1, make_pool(2, 4, 8, 16, 1, 4, 2)), ValueError, "one batch"),
    (lambda l, k: _swap_level(l, 1, make_pool(2, 4, 16, 16, 1, 1, 1)), ValueError, "final"),
    (lambda l, k: k.update(ids=torch.tensor([2, 0, 2])), IndexError, r"level 1.*\[0, 2\)"),
    (lambda l, k: k.update(ids=torch.tensor([2, 0, 1]), row_offsets=[0, 5]), IndexError, "level 1"),
])
def test_levels_bad_input_rejected_before_any_kernel(monkeypatch, change, error, match):
    """What one launch per depth needs, checked on the host with the level named."""
    monkeypatch.setattr(head_kernels, "levels_forward", lambda *a, **k: pytest.fail("a kernel ran"))
    with pytest.raises(error, match=match):
        _bad_levels(change)()


def _count_launches(monkeypatch):
    counts = {}
    cls = type(head_kernels._conv_fwd_kernel)
    getitem = cls.__getitem__

    def counted(self, grid):
        counts[self.fn.__name__ if hasattr(self, "fn") else self.__name__] = \
            counts.get(self.fn.__name__ if hasattr(self, "fn") else self.__name__, 0) + 1
        return getitem(self, grid)
    monkeypatch.setattr(cls, "__getitem__", counted)
    return counts


def test_launch_count_does_not_grow_with_levels(monkeypatch):
    """Kernel launches per forward and per backward depend on the depth only: 1, 2 and 4 levels (one of
    them shallower) launch the same kernels the same number of times."""
    launched = _count_launches(monkeypatch)
    results = []
    for levels in ([(3, 16, 2, 2, [1])], [(3, 16, 2, 2, [1]), (4, 8, 1, 2, [0])],
                   [(3, 16, 2, 2, [1]), (4, 8, 1, 2, [0]), (3, 16, 2, 2, [0, 1]), (5, 8, 1, 1, [0])]):
        per_level, ids, counts = make_levels(4, levels, hidden=8, batch=1)
        ops = [leaves(a) for a in per_level]
        lists = [[a[i] for a in ops] for i in range(7)]
        launched.clear()
        with use_backend("triton", "head_stack"):
            out = head_levels(*lists, ids, counts, num_groups=4)
            forward = dict(launched)
            launched.clear()
            out.sum().backward()
        results.append((forward, dict(launched)))
    depth = 2
    # conv + GroupNorm finish per depth, normalise+SiLU between depths, final
    assert sum(results[0][0].values()) == 3 * depth
    # final; finish, apply, wgrad, dgrad per depth; normalise+SiLU of every deeper layer's input (for its wgrad)
    assert sum(results[0][1].values()) == 1 + 4 * depth + depth - 1
    assert results[1] == results[0] and results[2] == results[0], results


# ============================================================================ sm_90 compile, no GPU
H100_SHARED_LIMIT = 227 * 1024


@pytest.mark.slow
def test_kernels_compile_for_h100_without_spills():
    """Every launch head_levels makes at SDXL head shapes (the 10-level pool in one call, and single levels)
    compiles for sm_90a, fits in shared memory, and (bf16) does not spill registers. Runs tests/sm90_compile.py
    (the heads family) in a subprocess (no interpreter, no GPU)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, "heads", "bfloat16", "float32"], capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip("Triton's bundled ptxas is not available")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"kernel"')]
    kernels = {"_conv_fwd_kernel", "_gn_fwd_finish_kernel", "_final_fwd_kernel", "_final_bwd_kernel",
               "_gn_bwd_finish_kernel", "_gn_bwd_apply_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel",
               "_norm_silu_kernel"}
    assert {r["kernel"] for r in results} >= kernels
    # the 10-level SDXL pool in one call: every kernel compiled with 10 levels' tuples (final, layer 1) and
    # the shallower prefixes (6 levels at depth 3, 3 at depth 4)
    assert {r["kernel"] for r in results if r["constexprs"].get("L") == 10} == kernels
    assert {r["constexprs"].get("L") for r in results} >= {1, 3, 6, 10}
    for r in results:
        what = f"{r['kernel']} {r['dtype']} {r['constexprs']}"
        assert r["shared"] <= H100_SHARED_LIMIT, f"{what}: {r['shared']} bytes of shared memory"
        assert r["spill_bytes"] <= (0 if r["dtype"] == "bfloat16" else 64), f"{what}: spills {r['spill_bytes']} B"


def test_no_recompilation_when_head_counts_change():
    """Per-level head counts 1..16 in any mix compile NO new kernel: tests/heads_compile_count.py binds every
    launch of the 10-level SDXL forward + backward with Triton's own binder for sm_90 and counts distinct
    kernel-cache keys (no GPU; meta tensors)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "heads_compile_count.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, "6"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["keys_first"] > 0 and result["new_per_mix"][1:] == [0] * (len(result["mixes"]) - 1), result
    assert result["keys_total"] == result["keys_first"], result


# ====================================================================================== torch.compile
@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_opcheck(backend):
    """torch.library.opcheck: schema, fake-tensor shapes/strides, autograd registration, AOT dispatch."""
    a = leaves(make_pool(4, 5, 8, 16, 1, 4, 1))
    b = leaves(make_pool(3, 6, 16, 16, 2, 4, 1))      # a second level, one layer deeper
    op_args = ([a[0], b[0]], *([*a[i], *b[i]] for i in range(1, 5)), [a[5], b[5]], [a[6], b[6]],
               torch.tensor([3, 1, 2]), [2, 1], [0, 0], [1, 2], 4, 1e-5)
    with use_backend(backend, "head_stack"):
        torch.library.opcheck(torch.ops.nitrokernels.head_levels_fwd.default, op_args)



def test_torch_compile_fullgraph_eager_backend():
    args = make_pool(4, 5, 16, 16, 2, 1, 2)
    ids = torch.tensor([3, 1, 3])
    grad_out = grad_out_for(ids, 2, 16, 2, 1, torch.float32)

    def f(*a):
        return head_stack(*a, ids, 4) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with use_backend("eager", "head_stack"):
        eager_args, compiled_args = leaves(args), leaves(args)
        expected = f(*eager_args)
        expected.backward(grad_out)
        got = compiled(*compiled_args)
        got.backward(grad_out)
    torch.testing.assert_close(got, expected)
    for e, g in zip(flat(eager_args), flat(compiled_args)):
        assert g.grad.layout == e.grad.layout
        torch.testing.assert_close(dense(g.grad), dense(e.grad))


# ================================================================================================ GPU
@pytest.fixture
def exact_cudnn():
    """cuDNN without TF32 for the fp64/fp32 references of one test (restored afterwards)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def _gpu_case(dtype, channels, size, depth, k, batch=2, heads=(3, 0, 3, 1), hidden=256, pool=4):
    ids = torch.tensor(heads, device="cuda")
    args = make_pool(pool, channels, size, hidden, depth, k, batch, device="cuda")
    grad_out = grad_out_for(ids, batch, size, depth, k, torch.float32, "cuda")
    ref_out, ref_grads = run_loop(leaves(args, torch.float64), ids, 32, grad_out)
    out, grads = run_op(leaves(args, dtype), ids, 32, grad_out, "triton")
    if dtype == torch.float32:
        assert_close_to_reference(out, ref_out, name="logits")
        for name, g, r in zip(param_names(depth), grads, ref_grads):
            assert_close_to_reference(dense(g), r, name=f"grad {name}")
        return
    eager_out, eager_grads = run_loop(leaves(args, dtype), ids, 32, grad_out)
    for name, g, e, r in zip(["logits"] + param_names(depth), [out, *grads], [eager_out, *eager_grads],
                             [ref_out, *ref_grads]):
        assert_close_to_reference(dense(g), r, e, atol=ulp_floor(r, dtype), name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("channels, size, depth, k", [(320, 64, 4, 4), (1280, 32, 3, 4), (640, 64, 3, 1)])
def test_gpu_sdxl_level_bf16(poisoned, channels, size, depth, k):
    _gpu_case(torch.bfloat16, channels, size, depth, k)


@pytest.mark.gpu
def test_gpu_fp32(poisoned, exact_cudnn):
    _gpu_case(torch.float32, 320, 32, 3, 4)


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph_capture():
    """A fixed head count runs without host syncs and can be captured (forward + backward) in a CUDA graph."""
    dtype, batch, size, depth = torch.bfloat16, 2, 32, 3
    ids = torch.tensor([1, 0, 1, 3], device="cuda")
    args = leaves(make_pool(4, 64, size, 64, depth, 4, batch, dtype=dtype, device="cuda"))
    grad_out = torch.randn(4, batch, device="cuda", dtype=dtype)
    params = flat(args)

    def step():
        out = head_stack(*args, ids, 32)
        return (out, *torch.autograd.grad(out, params, grad_out))

    assert_graph_capturable(step)
