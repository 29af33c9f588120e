"""nitrokernels.ops.attention (Triton flash attention fwd+bwd, SDPA fallback) and NitroAttnProcessor.

Triton runs under its CPU interpreter here (fp32, fp16; its tl.dot mishandles bf16, so bf16 is GPU-only),
on tiny shapes with ragged tails (L = 33, 77, 150, ...) and head dims 16 / 32 / 40 / 64.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import nitrokernels.kernels.attention as attn_kernels
from nitrokernels.nn.attention import NitroAttnProcessor, fused_qkv_supported
from nitrokernels.ops.attention import (ATTENTION, attention, attention_fallbacks, explain_attention,
                                        reset_attention_fallbacks, xformers_status)
from nitrokernels.ops.dispatch import BackendUnavailable, use_backend
from nitrokernels.ops.reference import attention_reference
from nitrokernels.testing import assert_close_to_reference, non_contiguous, poison_, random_tensor, to_reference

HAS_CUDA = torch.cuda.is_available()
diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every out / dq / dk / dv buffer the Triton wrapper allocates starts as NaN."""
    real = attn_kernels.empty_like_layout
    monkeypatch.setattr(attn_kernels, "empty_like_layout", lambda *a, **k: poison_(real(*a, **k)))


def _qkv(b, h, lq, lk, d, dtype, device, layout="bhld"):
    def make(length):
        if layout == "blhd":  # transposed view of [B, L, H, D] memory, as the attention processor passes
            return random_tensor((b, length, h, d), dtype=dtype, device=device).transpose(1, 2).requires_grad_()
        t = random_tensor((b, h, length, d), dtype=dtype, device=device)
        return non_contiguous(t) if layout == "strided" else t.requires_grad_()

    q = make(lq)
    k, v = make(lk), make(lk)
    for t in (q, k, v):
        t.requires_grad_()
    return q, k, v


def _check_against_reference(q, k, v, backend, scale=None, eager=None):
    grad = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=q.dtype, device=q.device)
    with use_backend(backend, "attention"):
        out = attention(q, k, v, scale=scale)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    rq, rk, rv = to_reference((q, k, v))
    ref = attention_reference(rq, rk, rv, scale=scale)
    ref_grads = torch.autograd.grad(ref, (rq, rk, rv), grad.to(torch.float64))
    if eager is None:
        eager_out, eager_grads = None, (None, None, None)
    else:
        eager_out, eager_grads = eager
    assert_close_to_reference(out, ref, eager_out, name=f"{backend} out")
    for name, g, r, e in zip("qkv", grads, ref_grads, eager_grads):
        assert_close_to_reference(g, r, e, name=f"{backend} d{name}")
    return out, grads


SHAPES = [  # (B, H, Lq, Lk, D)
    (1, 2, 33, 77, 64),   # cross-attention-like odd key length
    (2, 2, 64, 64, 16),   # block-aligned
    (1, 1, 17, 5, 40),    # head dim padded to 64 inside the kernel, Lk < one block
    (2, 2, 33, 33, 32),
    (1, 2, 150, 33, 16),  # few key blocks: the dK/dV query loop is split across programs
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_fp32_forward_and_grads_match_fp64(shape, backend, device, poisoned_outputs):
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, lq, lk, d, torch.float32, device)
    _check_against_reference(q, k, v, backend)


@pytest.mark.parametrize("layout", ["blhd", "strided"])
def test_non_contiguous_inputs(layout, device, poisoned_outputs):
    q, k, v = _qkv(2, 2, 33, 77, 32, torch.float32, device, layout=layout)
    assert not q.is_contiguous()
    out, grads = _check_against_reference(q, k, v, "triton")
    if layout == "blhd":  # output and grads follow the [B, L, H, D] memory layout: transpose+reshape is free
        assert out.transpose(1, 2).is_contiguous()
        assert all(g.transpose(1, 2).is_contiguous() for g in grads)


def test_scale_argument(device):
    q, k, v = _qkv(1, 2, 33, 20, 16, torch.float32, device)
    _check_against_reference(q, k, v, "triton", scale=0.37)


def test_fp16_within_twice_eager_error(device):
    dtype = torch.float16
    q, k, v = _qkv(2, 2, 65, 77, 64, dtype, device)
    grad = torch.randn(2, 2, 65, 64, dtype=dtype, device=device)
    eager = F.scaled_dot_product_attention(q, k, v) if device.type == "cuda" else attention_reference(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v), grad)
    _check_against_reference(q, k, v, "triton", eager=(eager.detach(), eager_grads))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 10, 1024, 1024, 64), (2, 10, 1030, 77, 64), (1, 4, 257, 300, 128),
                                   (2, 8, 333, 77, 40)])
def test_gpu_low_precision_within_twice_sdpa_error(shape, dtype, poisoned_outputs):
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, lq, lk, d, dtype, torch.device("cuda"), layout="blhd")
    grad = torch.randn(b, h, lq, d, dtype=dtype, device="cuda")
    with use_backend("eager", "attention"):
        eager = attention(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v), grad)
    _check_against_reference(q, k, v, "triton", eager=(eager.detach(), eager_grads))


# ------------------------------------------------------------------------------------------------ dispatch
def test_mask_dropout_and_big_head_dim_fall_back_with_reasons(device):
    reset_attention_fallbacks()
    q, k, v = _qkv(1, 2, 9, 7, 16, torch.float32, device)
    mask = torch.rand(1, 1, 9, 7, device=device) > 0.3
    mask[..., 0] = True
    out = attention(q, k, v, attn_mask=mask)
    ref = attention_reference(*to_reference((q, k, v)), attn_mask=mask)
    assert_close_to_reference(out, ref)
    reasons = attention_fallbacks()
    assert any("mask" in r for r in reasons), reasons

    big = random_tensor((1, 1, 5, 160), device=device)
    assert any("head dim" in r for r in explain_attention(big, big, big)["triton"])
    assert any("dropout" in r for r in explain_attention(q, k, v, dropout_p=0.1)["triton"])
    assert any("causal" in r for r in explain_attention(q, k, v, is_causal=True)["triton"])
    half = q.detach().to(torch.float64)
    assert any("dtype" in r for r in explain_attention(half, half, half)["triton"])
    with use_backend("triton", "attention"), pytest.raises(BackendUnavailable, match="mask"):
        attention(q, k, v, attn_mask=mask)
    assert "xformers" in xformers_status()


def test_triton_is_preferred_when_it_applies(device):
    q, k, v = _qkv(1, 2, 9, 7, 16, torch.float32, device)
    assert ATTENTION.select(q, k, v).backend == "triton"
    out = attention(q, k, v)
    assert "flash_attn_fwd" in type(out.grad_fn).__name__


def test_input_errors(device):
    q, k, v = _qkv(1, 2, 9, 7, 16, torch.float32, device)
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="dtype"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match="head dims differ"):
        attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="lengths differ"):
        attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="batch and heads"):
        attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="scale"):
        attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="not both"):
        attention(q, k, v, attn_mask=torch.ones(9, 7, dtype=torch.bool, device=device), is_causal=True)
    with pytest.raises(TypeError, match="attn_mask"):
        attention(q, k, v, attn_mask=torch.ones(9, 7, dtype=torch.int64, device=device))


def test_torch_compile_fullgraph_no_graph_break(device):
    q, k, v = _qkv(1, 2, 33, 20, 16, torch.float32, device)

    def f(q, k, v):
        return attention(q, k, v).sin()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = f(q, k, v)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_fake_impls_match_real_layouts():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = torch.randn(2, 9, 3, 16).transpose(1, 2)
    k = torch.randn(2, 3, 7, 16)
    with FakeTensorMode() as mode:
        fq, fk = mode.from_tensor(q), mode.from_tensor(k)
        out, lse = torch.ops.nitrokernels.flash_attn_fwd(fq, fk, fk, 0.25)
        grads = torch.ops.nitrokernels.flash_attn_bwd(out, fq, fk, fk, out, lse, 0.25)
    assert out.shape == (2, 3, 9, 16) and out.transpose(1, 2).is_contiguous()
    assert lse.shape == (2, 3, 9) and lse.dtype == torch.float32
    assert [tuple(g.shape) for g in grads] == [(2, 3, 9, 16), (2, 3, 7, 16), (2, 3, 7, 16)]
    assert grads[1].is_contiguous() and grads[0].transpose(1, 2).is_contiguous()


# --------------------------------------------------------------------------------------------- processor
def _attention_module(**kwargs):
    kwargs = {"query_dim": 32, "heads": 2, "dim_head": 16, **kwargs}
    return Attention(**kwargs)


PROCESSOR_CASES = {
    "self": dict(module=dict(bias=True), ndim=3, cross=False, mask=False),
    "self-nobias-mask": dict(module=dict(), ndim=3, cross=False, mask=True),
    "self-4d-groupnorm-residual": dict(module=dict(bias=True, norm_num_groups=8, residual_connection=True,
                                                   rescale_output_factor=2.0), ndim=4, cross=False, mask=False),
    "cross": dict(module=dict(cross_attention_dim=24), ndim=3, cross=True, mask=False),
    "cross-mask": dict(module=dict(cross_attention_dim=24, bias=True), ndim=3, cross=True, mask=True),
    "cross-normcross": dict(module=dict(cross_attention_dim=24, cross_attention_norm="layer_norm"), ndim=3,
                            cross=True, mask=False),
    "spatial-norm": dict(module=dict(spatial_norm_dim=4, bias=True), ndim=4, cross=False, mask=False),
    "qk-norm-dim40": dict(module=dict(dim_head=40, qk_norm="layer_norm", bias=True), ndim=3, cross=False,
                          mask=False),
}


def _processor_inputs(case, device):
    b = 2
    inputs = {}
    if case["ndim"] == 4:
        hidden = random_tensor((b, 32, 3, 5), device=device, requires_grad=True)
    else:
        hidden = random_tensor((b, 11, 32), device=device, requires_grad=True)
    lk = 11 if case["ndim"] == 3 else 15
    if case["cross"]:
        lk = 77 if case["mask"] else 9
        inputs["encoder_hidden_states"] = random_tensor((b, lk, 24), device=device, requires_grad=True)
    if case["mask"]:
        keep = torch.rand(b, 1, lk, device=device) > 0.3
        keep[..., 0] = True
        inputs["attention_mask"] = (1.0 - keep.float()) * -10000.0  # how diffusers UNets pass masks
    if "spatial_norm_dim" in case["module"]:
        inputs["temb"] = random_tensor((b, 4, 2, 2), device=device)
    return hidden, inputs


@pytest.mark.parametrize("name", sorted(PROCESSOR_CASES))
def test_processor_matches_attn_processor_2_0(name, device):
    case = PROCESSOR_CASES[name]
    ref_module = _attention_module(**case["module"]).to(device)
    module = copy.deepcopy(ref_module)
    module.set_processor(NitroAttnProcessor())
    assert type(ref_module.processor) is AttnProcessor2_0
    hidden, inputs = _processor_inputs(case, device)
    out = module(hidden, **inputs)
    ref = ref_module(hidden, **inputs)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)

    grad = torch.randn_like(out)
    tensors = [hidden] + [t for t in inputs.values() if t.requires_grad]
    got = torch.autograd.grad(out, tensors + list(module.parameters()), grad)
    want = torch.autograd.grad(ref, tensors + list(ref_module.parameters()), grad)
    names = ["input"] * len(tensors) + [n for n, _ in module.named_parameters()]
    for n, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"grad of {n}: {m}")


def test_processor_scale_qk_false_matches_classic_processor(device):
    ref_module = _attention_module(scale_qk=False, bias=True).to(device)
    assert type(ref_module.processor) is AttnProcessor and ref_module.scale == 1.0
    module = copy.deepcopy(ref_module)
    module.set_processor(NitroAttnProcessor())
    hidden = random_tensor((2, 11, 32), device=device, scale=0.3)
    torch.testing.assert_close(module(hidden), ref_module(hidden), rtol=2e-5, atol=2e-5)


def test_fused_qkv_is_used_and_cache_tracks_weight_updates(device, monkeypatch):
    module = _attention_module(bias=True).to(device)
    proc = NitroAttnProcessor()
    module.set_processor(proc)
    assert fused_qkv_supported(module)
    concats = []
    real_concat = NitroAttnProcessor._concat
    monkeypatch.setattr(NitroAttnProcessor, "_concat", staticmethod(lambda *a: concats.append(1) or real_concat(*a)))
    hidden = random_tensor((2, 11, 32), device=device)
    reference = AttnProcessor2_0()

    with torch.no_grad():
        out1 = module(hidden)
        module(hidden)
        assert len(concats) == 1  # second call served from the cache
        torch.testing.assert_close(out1, reference(module, hidden), rtol=2e-5, atol=2e-5)

    # a training step: gradients must reach to_q / to_k / to_v through the fused GEMM
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    module(hidden).square().mean().backward()
    assert all(module.get_submodule(n).weight.grad is not None for n in ("to_q", "to_k", "to_v"))
    optimizer.step()
    with torch.no_grad():
        out2 = module(hidden)
        torch.testing.assert_close(out2, reference(module, hidden), rtol=2e-5, atol=2e-5)
        assert not torch.allclose(out1, out2)

        # load_state_dict (in-place copy_) also bumps the versions
        fresh = _attention_module(bias=True).to(device)
        module.load_state_dict(fresh.state_dict())
        torch.testing.assert_close(module(hidden), reference(module, hidden), rtol=2e-5, atol=2e-5)

        # writes through .data are invisible to version counters: clear_cache() is the documented remedy
        module.to_k.weight.data.mul_(2.0)
        proc.clear_cache()
        torch.testing.assert_close(module(hidden), reference(module, hidden), rtol=2e-5, atol=2e-5)


def test_deepcopy_does_not_share_the_cache(device):
    module = _attention_module(bias=True).to(device)
    module.set_processor(NitroAttnProcessor())
    hidden = random_tensor((1, 7, 32), device=device)
    with torch.no_grad():
        module(hidden)
        clone = copy.deepcopy(module)
        assert len(module.processor._cache) == 1 and len(clone.processor._cache) == 0
        clone.to_q.weight.add_(1.0)
        torch.testing.assert_close(clone(hidden), AttnProcessor2_0()(clone, hidden), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(module(hidden), AttnProcessor2_0()(module, hidden), rtol=2e-5, atol=2e-5)


def test_frozen_weights_use_cache_and_still_give_input_grads(device):
    module = _attention_module(bias=True).to(device).requires_grad_(False)
    module.set_processor(NitroAttnProcessor())
    hidden = random_tensor((2, 11, 32), device=device, requires_grad=True)
    out = module(hidden)
    (g,) = torch.autograd.grad(out.sum(), hidden)
    ref_hidden = hidden.detach().clone().requires_grad_()
    (r,) = torch.autograd.grad(AttnProcessor2_0()(module, ref_hidden).sum(), ref_hidden)
    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_no_fusion_when_projections_differ_or_are_hooked():
    module = _attention_module(cross_attention_dim=24)
    assert not fused_qkv_supported(module)
    module = _attention_module(bias=True)
    module.to_k.register_forward_hook(lambda *a: None)
    assert not fused_qkv_supported(module)


def test_unsupported_reason():
    assert NitroAttnProcessor.unsupported_reason(_attention_module()) is None
    added = Attention(query_dim=32, heads=2, dim_head=16, added_kv_proj_dim=8, only_cross_attention=True)
    assert "only_cross_attention" in NitroAttnProcessor.unsupported_reason(added)
    pre_only = Attention(query_dim=32, heads=2, dim_head=16, pre_only=True)
    assert "pre_only" in NitroAttnProcessor.unsupported_reason(pre_only)


def test_processor_under_torch_compile_fullgraph(device):
    module = _attention_module(bias=True, norm_num_groups=8, residual_connection=True).to(device)
    module.set_processor(NitroAttnProcessor())
    hidden = random_tensor((2, 32, 3, 5), device=device, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(hidden)
    (g,) = torch.autograd.grad(out.sum(), hidden)
    ref = AttnProcessor2_0()(module, hidden)
    (r,) = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_custom_ops_pass_opcheck(device):
    q, k, v = _qkv(1, 2, 9, 7, 16, torch.float32, device)
    torch.library.opcheck(torch.ops.nitrokernels.flash_attn_fwd.default, (q, k, v, 0.25))
    out, lse = torch.ops.nitrokernels.flash_attn_fwd(q.detach(), k.detach(), v.detach(), 0.25)
    torch.library.opcheck(torch.ops.nitrokernels.flash_attn_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.25))
