"""group_norm_silu: forward and every gradient (x, weight, bias, temb) against a float64 reference, per backend.

Each backend is forced in turn: eager (the reference itself, in the tested dtype), triton (Triton's CPU
interpreter when there is no GPU), cuda_ext (GPU only). Output buffers are poisoned with NaN so an element a
kernel forgets to write fails. Low precision passes at <= 2x eager PyTorch's own error in that dtype.
"""
import os

import pytest
import torch
from torch import nn

import nitrokernels.ops.group_norm as gn_ops
from nitrokernels import testing
from nitrokernels.nn import GroupNormSiLU
from nitrokernels.ops import BackendUnavailable, group_norm_silu, use_backend
from nitrokernels.ops.reference import group_norm_silu_reference

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["eager", "triton", pytest.param("cuda_ext", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]

# (shape, groups, temb, weight, bias, act): odd sizes on purpose (C=6 in 3 groups, 5x7 maps, batch 1, 3-D / 5-D)
CASES = {
    "odd_4d": ((1, 6, 5, 7), 3, True, True, True, "silu"),
    "plain_4d": ((2, 8, 4, 4), 4, False, False, False, None),
    "seq_3d": ((2, 12, 9), 4, True, True, True, "silu"),
    "vol_5d": ((1, 16, 3, 4, 5), 8, True, True, False, "silu"),
}


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Dense NCHW (contiguous) or dense channels-last of any rank (channels innermost)."""
    if layout == "nchw":
        return t.contiguous()
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output / dx buffer the backends allocate starts as NaN."""
    real = gn_ops._empty_like_layout
    monkeypatch.setattr(gn_ops, "_empty_like_layout", lambda x, dtype=None: testing.poison_(real(x, dtype)))


def make_inputs(shape, groups, has_temb, has_weight, has_bias, device, dtype, layout="nchw", param_dtype=None):
    """float64 master copies (requires_grad) and the same values in `dtype` on `device` (in `layout`)."""
    c, n = shape[1], shape[0]
    masters = [testing.random_tensor(shape, dtype=torch.float64, scale=1.5, offset=0.3),
               testing.random_tensor((c,), dtype=torch.float64, offset=1.0) if has_weight else None,
               testing.random_tensor((c,), dtype=torch.float64) if has_bias else None,
               testing.random_tensor((n, c), dtype=torch.float64) if has_temb else None]
    pd = param_dtype or dtype
    # the reference sees exactly the values the kernels see (rounded to their dtypes), in float64
    masters = [m.to(dt).to(torch.float64).requires_grad_() if m is not None else None
               for m, dt in zip(masters, (dtype, pd, pd, pd))]
    test = [to_layout(masters[0].detach(), layout).to(device=device, dtype=dtype)]
    test += [m.detach().to(device=device, dtype=pd) if m is not None else None for m in masters[1:]]
    test = [t.requires_grad_() if t is not None else None for t in test]
    return masters, test


def run(fn, inputs, groups, act, grad_out):
    x, w, b, t = inputs
    out = fn(x, groups, w, b, 1e-5, temb=t, act=act)
    present = [v for v in inputs if v is not None]
    grads = testing.grads_of(out, present, grad_out.to(device=out.device))
    return out, list(grads)


def check_against_reference(backend, shape, groups, has_temb, has_w, has_b, act, device, dtype, layout="nchw",
                            param_dtype=None):
    masters, test = make_inputs(shape, groups, has_temb, has_w, has_b, device, dtype, layout, param_dtype)
    grad_out = testing.random_tensor(shape, dtype=dtype).to(torch.float64)
    ref_out, ref_grads = run(group_norm_silu_reference, masters, groups, act, grad_out)
    eager = None
    if dtype not in testing.FULL_PRECISION_RTOL:  # eager PyTorch in the same low precision: the yardstick
        _, eager_in = make_inputs(shape, groups, has_temb, has_w, has_b, device, dtype, layout, param_dtype)
        for e, m in zip(eager_in, masters):
            if e is not None:
                e.data.copy_(m.detach())
        eager = run(group_norm_silu_reference, eager_in, groups, act, grad_out.to(dtype))
        eager = (eager[0].to(dtype), eager[1])  # what eager returns in x's dtype (fp32 params promote)
    with use_backend(backend, "group_norm_silu"):
        out, grads = run(group_norm_silu, test, groups, act, grad_out.to(dtype))
    assert out.dtype == dtype and out.shape == shape
    if device.type == "cuda" or backend != "eager":
        assert out.stride() == test[0].stride(), "output must keep the input's layout"
    names = [n for n, v in zip(("x", "weight", "bias", "temb"), test) if v is not None]
    testing.assert_close_to_reference(out, ref_out, eager[0] if eager else None, name="out")
    for i, (name, g, r) in enumerate(zip(names, grads, ref_grads)):
        assert g.dtype == [v for v in test if v is not None][i].dtype
        testing.assert_close_to_reference(g, r, eager[1][i] if eager else None, name=f"grad {name}")


# ============================================================================ correctness per backend
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(backend, dtype, layout, case, device):
    if backend == "eager" and dtype == torch.float16 and device.type == "cpu" and case == "vol_5d":
        pytest.skip("nothing new: eager fp16 is its own yardstick")
    check_against_reference(backend, *CASES[case], device=device, dtype=dtype, layout=layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_parameters_with_half_activations(backend, device):
    """Mixed precision (e.g. autocast conv output with fp32 norm parameters): params and temb stay fp32."""
    check_against_reference(backend, (2, 12, 6, 5), 4, True, True, True, "silu", device, torch.float16,
                            param_dtype=torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("tiles", [dict(BLOCK_C=4, BLOCK_S=8, CHUNKS=3, BLOCK_CG=2, BLOCK_K=2),
                                   dict(BLOCK_C=16, BLOCK_S=4, CHUNKS=5, BLOCK_CG=2, BLOCK_K=4)], ids=["a", "b"])
def test_triton_multi_chunk_plans(layout, tiles, device):
    """The GPU plans split each group over chunks and channel blocks; force such plans on small shapes."""
    from nitrokernels.kernels.group_norm import plan_override

    with plan_override(**tiles):
        check_against_reference("triton", (2, 16, 5, 7), 4, True, True, True, "silu", device, torch.float32,
                                layout=layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, device):
    masters, test = make_inputs((2, 6, 4, 5), 3, True, True, True, device, torch.float32)
    x = testing.non_contiguous(test[0].detach()).requires_grad_()
    assert not x.is_contiguous()
    grad_out = testing.random_tensor(x.shape, dtype=torch.float64)
    ref_out, ref_grads = run(group_norm_silu_reference, masters, 3, "silu", grad_out)
    with use_backend(backend, "group_norm_silu"):
        out, grads = run(group_norm_silu, [x] + test[1:], 3, "silu", grad_out.float())
    testing.assert_close_to_reference(out, ref_out)
    for g, r in zip(grads, ref_grads):
        testing.assert_close_to_reference(g, r)


@pytest.mark.parametrize("temb_shape", ["n_c_1_1", "1_c"])
def test_temb_shapes_broadcast(temb_shape, device):
    x = testing.random_tensor((3, 8, 4, 4), device=device, requires_grad=True)
    t = testing.random_tensor((3, 8, 1, 1) if temb_shape == "n_c_1_1" else (1, 8), device=device, requires_grad=True)
    out = group_norm_silu(x, 2, temb=t)
    ref = group_norm_silu_reference(x.double(), 2, temb=t.double().reshape(t.shape[0], 8).expand(3, 8))
    testing.assert_close_to_reference(out, ref)
    (gt,) = torch.autograd.grad(out.sum(), [t])
    (rt,) = torch.autograd.grad(ref.sum(), [t])
    assert gt.shape == t.shape
    testing.assert_close_to_reference(gt, rt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_spatial_dims(backend, device):
    """(N, C) input: every group is Cg values of one sample."""
    check_against_reference(backend, (3, 32), 4, True, True, True, "silu", device, torch.float32)


@pytest.mark.parametrize("shape", [(0, 6, 4, 4), (2, 6, 0, 3)])
def test_empty_inputs(shape, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.ones(6, device=device, requires_grad=True)
    out = group_norm_silu(x, 3, w, temb=torch.zeros(shape[0], 6, device=device))
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and (w.grad == 0).all()


def test_float64_runs_eager_by_default():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert gn_ops.GROUP_NORM_SILU.select(x, None, None, None, 2, 1e-5, True).backend == "eager"
    out = group_norm_silu(x, 2)
    assert torch.allclose(out, group_norm_silu_reference(x, 2), atol=1e-12)


# ================================================================================== input validation
def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="C=6 is not divisible by num_groups=4"):
        group_norm_silu(x, 4)
    with pytest.raises(ValueError, match=r"temb must have shape \(N, C\) = \(2, 6\)"):
        group_norm_silu(x, 3, temb=torch.randn(2, 5))
    with pytest.raises(ValueError, match="temb must have shape"):
        group_norm_silu(x, 3, temb=torch.randn(3, 6))
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has torch.float32"):
        group_norm_silu(x, 3, torch.ones(6, dtype=torch.float16))
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        group_norm_silu(torch.ones(2, 6, 4, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        group_norm_silu(x, 3, torch.ones(5))
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        group_norm_silu(x, 3, None, torch.zeros(6, device="meta"))
    with pytest.raises(ValueError, match="act must be 'silu' or None"):
        group_norm_silu(x, 3, act="gelu")
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        group_norm_silu(x, 0)
    with pytest.raises(ValueError, match=r"must be \(N, C, \*spatial\)"):
        group_norm_silu(torch.randn(6), 3)


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors: the CUDA backend must refuse them")
def test_forcing_cuda_ext_on_cpu_names_the_reason():
    with use_backend("cuda_ext", "group_norm_silu"), pytest.raises(BackendUnavailable, match="cuda_ext"):
        group_norm_silu(torch.randn(1, 4, 2, 2), 2)


def test_explain_lists_a_reason_for_every_skipped_backend(device):
    args, kwargs = gn_ops.GROUP_NORM_SILU.example(device)
    reasons = gn_ops.GROUP_NORM_SILU.explain(*args, **kwargs)
    assert set(reasons) == {"cuda_ext", "triton", "eager"} and reasons["eager"] == []
    chosen = gn_ops.GROUP_NORM_SILU.select(*args, **kwargs).backend
    assert chosen == next(b for b in ("cuda_ext", "triton", "eager") if not reasons[b])


# ============================================================================ custom ops / torch.compile
def test_custom_op_registration_passes_opcheck(device):
    x = testing.random_tensor((2, 6, 3, 5), device=device, requires_grad=True)
    w = testing.random_tensor((6,), device=device, requires_grad=True)
    t = testing.random_tensor((2, 6), device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.nitrokernels.group_norm_silu.default, (x, w, None, t, 3, 1e-5, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_torch_compile_fullgraph_no_graph_break(layout, device):
    """A conv -> fused norm -> conv model compiles as one graph (fullgraph=True fails on any break)."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), GroupNormSiLU(4, 8), nn.Conv2d(8, 4, 1)).to(device)
    temb = testing.random_tensor((2, 8), device=device, requires_grad=True)

    def fn(x, temb):
        h = model[0](x)
        h = group_norm_silu(h, 2, model[1].weight, model[1].bias, temb=temb)
        return model[2](model[1](h))

    x = to_layout(testing.random_tensor((2, 4, 6, 5), device=device), layout).requires_grad_()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_c = compiled(x, temb)
    grads_c = torch.autograd.grad(out_c.square().sum(), [x, temb, model[1].weight])
    out_e = fn(x, temb)
    grads_e = torch.autograd.grad(out_e.square().sum(), [x, temb, model[1].weight])
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_custom_op_and_eager_entry_agree(device):
    """The autograd.Function entry (eager mode) and the custom-op entry (compile/tracing) give equal results."""
    _, (x, w, b, t) = make_inputs((2, 6, 5, 3), 3, True, True, True, device, torch.float32)
    out_fast = group_norm_silu(x, 3, w, b, temb=t)
    out_op = torch.ops.nitrokernels.group_norm_silu(x, w, b, t, 3, 1e-5, True)[0]
    assert torch.equal(out_fast, out_op)
    g = torch.randn_like(out_fast)
    ga = torch.autograd.grad(out_fast, [x, w, b, t], g)
    gb = torch.autograd.grad(out_op, [x, w, b, t], g)
    for a, b_ in zip(ga, gb):
        assert torch.equal(a, b_)


# ===================================================================================== nn module
@pytest.mark.parametrize("act", ["silu", None])
def test_module_is_a_drop_in_for_group_norm(act, device):
    ref = nn.GroupNorm(4, 12, eps=1e-6).to(device)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    fused = GroupNormSiLU(4, 12, eps=1e-6, act=act).to(device)
    fused.load_state_dict(ref.state_dict())           # weights load across, both ways
    ref.load_state_dict(fused.state_dict())
    assert set(fused.state_dict()) == set(ref.state_dict())
    x = testing.random_tensor((2, 12, 5, 5), device=device)
    expected = ref(x)
    expected = torch.nn.functional.silu(expected) if act else expected
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    assert "act=" in repr(fused) and "12" in repr(fused)


def test_module_without_affine_and_with_temb(device):
    m = GroupNormSiLU(2, 4, affine=False).to(device)
    assert m.weight is None and m.bias is None and list(m.state_dict()) == []
    x = testing.random_tensor((3, 4, 2, 3), device=device)
    t = testing.random_tensor((3, 4), device=device)
    torch.testing.assert_close(m(x, t), group_norm_silu_reference(x, 2, temb=t), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        GroupNormSiLU(3, 4)
    with pytest.raises(ValueError, match="act"):
        GroupNormSiLU(2, 4, act="relu")


def test_module_from_group_norm_shares_parameters():
    norm = nn.GroupNorm(2, 6)
    fused = GroupNormSiLU.from_group_norm(norm)
    assert fused.weight is norm.weight and fused.bias is norm.bias and fused.eps == norm.eps


# ================================================================================== CUDA extension
@pytest.mark.gpu
def test_cuda_ext_is_built_and_chosen_for_aligned_shapes():
    from nitrokernels import _ext

    if not _ext.extension_available():
        pytest.skip(f"extension not loaded: {_ext.extension_status()}")
    x = torch.randn(2, 320, 32, 32, device="cuda", dtype=torch.bfloat16)
    assert gn_ops.GROUP_NORM_SILU.select(x, None, None, None, 32, 1e-5, True).backend == "cuda_ext"
    odd = torch.randn(1, 6, 5, 7, device="cuda", dtype=torch.bfloat16)
    assert gn_ops.GROUP_NORM_SILU.select(odd, None, None, None, 3, 1e-5, True).backend == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda_ext", "triton"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,groups", [((1, 320, 16, 16), 32), ((2, 64, 9, 7), 32), ((3, 40, 8, 8), 4)])
def test_gpu_sdxl_like_shapes_bf16(backend, layout, shape, groups):
    check_against_reference(backend, shape, groups, True, True, True, "silu", torch.device("cuda"), torch.bfloat16,
                            layout=layout)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_ext_unaligned_storage_offset(layout):
    """A view starting 2 bytes into its storage must take the scalar path and still be right."""
    base = torch.randn(2 * 64 * 8 * 8 + 1, device="cuda", dtype=torch.float16)
    x = base[1:].view(2, 64, 8, 8) if layout == "nchw" else base[1:].view(2, 8, 8, 64).movedim(-1, 1)
    assert x.data_ptr() % 16 != 0
    ref = group_norm_silu_reference(x.double(), 8)
    with use_backend("cuda_ext", "group_norm_silu"):
        out = group_norm_silu(x, 8)
    testing.assert_close_to_reference(out, ref, group_norm_silu_reference(x, 8))


# ============================================================ CUDA kernels, emulated on the CPU (no GPU needed)
CU_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "group_norm",
                         "group_norm_silu.cu")

# (shape, groups, layout, dtype, param dtype, temb, weight, bias, act, storage offset): vector and scalar paths,
# several chunks per sample, N == 1 (dweight written by the finalize kernel) and N > 1 (column-sum kernel),
# NHWC with more channel vectors than threads (C=1030 fp32: scalar path, 1030 > 256 vectors)
EMULATED = [
    ((1, 6, 5, 7), 3, "nchw", torch.float32, None, True, True, True, True, False),
    ((2, 16, 4, 4), 4, "channels_last", torch.float16, None, True, True, True, True, False),
    ((2, 16, 8, 8), 4, "nchw", torch.bfloat16, None, False, False, False, False, False),
    ((1, 64, 32, 32), 32, "nchw", torch.bfloat16, None, True, True, True, True, False),
    ((1, 64, 32, 32), 32, "channels_last", torch.bfloat16, torch.float32, True, True, True, True, False),
    ((3, 8, 9), 2, "channels_last", torch.float32, None, True, True, False, True, False),
    ((1, 16, 8, 8), 4, "channels_last", torch.float16, None, True, True, True, True, True),
    ((1, 1030, 2, 2), 10, "channels_last", torch.float32, None, True, True, True, True, False),
]


@pytest.fixture(scope="module")
def emulated_cuda_ops():
    import cuda_emulation

    reason = cuda_emulation.available()
    if reason:
        pytest.skip(f"CUDA emulation unavailable: {reason}")
    torch.ops.load_library(cuda_emulation.build(CU_SOURCE))
    return getattr(torch.ops, cuda_emulation.default_namespace(CU_SOURCE))


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(EMULATED)))
def test_cuda_kernels_emulated_on_cpu(case, emulated_cuda_ops):
    """csrc/group_norm/group_norm_silu.cu, every kernel, run thread by thread on the CPU against float64."""
    shape, groups, layout, dtype, pdtype, has_t, has_w, has_b, act, offset = EMULATED[case]
    masters, (x, w, b, t) = make_inputs(shape, groups, has_t, has_w, has_b, torch.device("cpu"), dtype, layout, pdtype)
    x, w, b, t = [v.detach() if v is not None else None for v in (x, w, b, t)]
    if offset:  # start 1 element into the storage: not 16-byte aligned, the scalar path
        storage = torch.empty(x.numel() + 1, dtype=dtype)
        shifted = torch.as_strided(storage, x.shape, x.stride(), storage_offset=1)
        shifted.copy_(x)
        x = shifted
    grad_out = testing.random_tensor(shape, dtype=dtype).to(torch.float64)
    dy = torch.empty_strided(x.shape, x.stride(), dtype=dtype)
    dy.copy_(grad_out)
    out, mean, rstd = emulated_cuda_ops.group_norm_silu_fwd(x, w, b, t, groups, 1e-5, act)
    dx, dw, db, dt = emulated_cuda_ops.group_norm_silu_bwd(dy, x, w, b, t, mean, rstd, groups, act)
    assert out.stride() == x.stride() and dx.stride() == x.stride()
    act_name = "silu" if act else None
    ref_out, ref_grads = run(group_norm_silu_reference, masters, groups, act_name, grad_out)
    eager = None
    if dtype != torch.float32:
        eager_in = [m.detach().to(v.dtype).requires_grad_() if m is not None else None
                    for m, v in zip(masters, (x, w, b, t))]
        eager = run(group_norm_silu_reference, eager_in, groups, act_name, grad_out.to(dtype))
        eager = (eager[0].to(dtype), eager[1])  # what eager returns in x's dtype (fp32 params promote)
    testing.assert_close_to_reference(out, ref_out, eager[0] if eager else None, name="out")
    mine = [g for g, m in zip((dx, dw, db, dt), masters) if m is not None]
    for i, (g, r) in enumerate(zip(mine, ref_grads)):
        testing.assert_close_to_reference(g, r, eager[1][i] if eager else None, name=f"grad {i}")
