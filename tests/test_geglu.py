"""nitrokernels.ops.geglu (Triton GEMM + gate*GELU epilogue, activation backward) and FusedGEGLU."""
import copy

import pytest
import torch

import nitrokernels.kernels.geglu as geglu_kernels
from nitrokernels.nn.geglu import FusedGEGLU
from nitrokernels.ops.dispatch import use_backend
from nitrokernels.ops.geglu import GEGLU, geglu
from nitrokernels.ops.reference import geglu_reference
from nitrokernels.testing import assert_close_to_reference, non_contiguous, poison_, random_tensor, to_reference

diffusers = pytest.importorskip("diffusers")
from diffusers.models.activations import GEGLU as DiffusersGEGLU  # noqa: E402


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """out / proj / grad_proj buffers allocated by the Triton wrappers start as NaN."""
    real = geglu_kernels._empty
    monkeypatch.setattr(geglu_kernels, "_empty", lambda *a, **k: poison_(real(*a, **k)))


def _inputs(lead, k, n, dtype, device, bias=True, strided=False):
    x = random_tensor((*lead, k), dtype=dtype, device=device)
    if strided:
        x = non_contiguous(x)
    x.requires_grad_()
    w = random_tensor((2 * n, k), dtype=dtype, device=device, scale=k ** -0.5, requires_grad=True)
    b = random_tensor((2 * n,), dtype=dtype, device=device, scale=0.5, requires_grad=True) if bias else None
    return x, w, b


def _check(x, w, b, backend, eager=None):
    with use_backend(backend, "geglu"):
        out = geglu(x, w, b)
    grad = torch.randn_like(out)
    params = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(out, params, grad)
    ref_params = to_reference(params)
    ref = geglu_reference(*ref_params) if b is not None else geglu_reference(ref_params[0], ref_params[1], None)
    ref_grads = torch.autograd.grad(ref, ref_params, grad.to(torch.float64))
    eager_out, eager_grads = eager if eager is not None else (None, [None] * len(params))
    assert_close_to_reference(out, ref, eager_out, name=f"{backend} out")
    for name, g, r, e in zip("xwb", grads, ref_grads, eager_grads):
        assert_close_to_reference(g, r, e, name=f"{backend} d{name}")


CASES = [  # (leading dims, K, N, bias, strided)
    ((2, 7), 40, 24, True, False),   # odd M, K not a multiple of BLOCK_K
    ((33,), 16, 16, False, False),
    ((1, 5, 3), 64, 48, True, True),  # 3 leading dims, non-contiguous x
    ((19,), 37, 21, True, False),    # everything odd
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-K{c[1]}-N{c[2]}-b{int(c[3])}-s{int(c[4])}")
@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_fp32_forward_and_grads_match_fp64(case, backend, device, poisoned_outputs):
    lead, k, n, bias, strided = case
    _check(*_inputs(lead, k, n, torch.float32, device, bias, strided), backend)


def test_fp16_within_twice_eager_error(device):
    x, w, b = _inputs((3, 21), 48, 40, torch.float16, device)
    with use_backend("eager", "geglu"):
        eager = geglu(x, w, b)
    grad = torch.randn_like(eager)
    eager_grads = torch.autograd.grad(eager, (x, w, b), grad)
    with use_backend("triton", "geglu"):
        out = geglu(x, w, b)
    grads = torch.autograd.grad(out, (x, w, b), grad)
    ref_params = to_reference((x, w, b))
    ref = geglu_reference(*ref_params)
    ref_grads = torch.autograd.grad(ref, ref_params, grad.to(torch.float64))
    assert_close_to_reference(out, ref, eager.detach())
    for name, g, r, e in zip("xwb", grads, ref_grads, eager_grads):
        assert_close_to_reference(g, r, e, name=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [((2, 1024), 1280, 5120), ((2, 333), 640, 2560), ((77,), 320, 1280)])
def test_gpu_low_precision_within_twice_eager_error(shape, dtype, poisoned_outputs):
    lead, k, n = shape
    x, w, b = _inputs(lead, k, n, dtype, torch.device("cuda"))
    with use_backend("eager", "geglu"):
        eager = geglu(x, w, b)
    grad = torch.randn_like(eager)
    eager_grads = torch.autograd.grad(eager, (x, w, b), grad)
    with use_backend("triton", "geglu"):
        out = geglu(x, w, b)
    grads = torch.autograd.grad(out, (x, w, b), grad)
    ref_params = to_reference((x, w, b))
    ref = geglu_reference(*ref_params)
    ref_grads = torch.autograd.grad(ref, ref_params, grad.to(torch.float64))
    assert_close_to_reference(out, ref, eager.detach())
    for name, g, r, e in zip("xwb", grads, ref_grads, eager_grads):
        assert_close_to_reference(g, r, e, name=f"d{name}")


def test_no_projection_saved_without_grad(device, monkeypatch):
    calls = []
    real = geglu_kernels.geglu_forward
    monkeypatch.setattr(geglu_kernels, "geglu_forward", lambda x, w, b, save: calls.append(save) or real(x, w, b, save))
    x, w, b = _inputs((5,), 16, 16, torch.float32, device)
    with torch.no_grad(), use_backend("triton", "geglu"):
        out = geglu(x, w, b)
    with use_backend("triton", "geglu"):
        geglu(x, w, b)
    assert calls == [False, True]
    torch.testing.assert_close(out, geglu_reference(x, w, b), rtol=2e-5, atol=2e-5)
    out, pre = torch.ops.nitrokernels.geglu_fwd(x, w, b, False)
    with pytest.raises(RuntimeError, match="without saving"):
        out.sum().backward()


def test_dispatch_reasons(device):
    x, w, b = _inputs((5,), 16, 16, torch.float32, device)
    reasons = GEGLU.explain(x, w.double(), b)["triton"]
    assert any("dtypes differ" in r for r in reasons)
    assert any("dtype torch.float64" in r for r in GEGLU.explain(x.double(), w.double(), b.double())["triton"])
    with use_backend("triton", "geglu"), pytest.raises(TypeError, match="must share a dtype"):
        geglu(x, w.double(), b)  # refused before any backend (no backend computes mixed dtypes outside autocast)
    assert GEGLU.select(x, w, b).backend == "triton"


def test_autocast_casts_like_linear(device, monkeypatch):
    calls = []
    real = geglu_kernels.geglu_forward
    monkeypatch.setattr(geglu_kernels, "geglu_forward", lambda x, w, b, save: calls.append(x.dtype) or real(x, w, b, save))
    x, w, b = _inputs((2, 5), 32, 16, torch.float32, device)
    dtype = torch.float16
    with torch.autocast(device.type, dtype=dtype):
        out = geglu(x, w, b)
        with use_backend("eager", "geglu"):
            ref = geglu(x, w, b)
        diffusers_like = geglu_reference(x, w, b)
    assert out.dtype == ref.dtype == diffusers_like.dtype == dtype
    assert calls == [dtype]  # the Triton kernel ran, in the autocast dtype
    torch.testing.assert_close(out, diffusers_like, rtol=2e-3, atol=2e-3)
    gx, gw = torch.autograd.grad(out.float().sum(), (x, w))
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32


def test_input_errors(device):
    x, w, b = _inputs((5,), 16, 16, torch.float32, device)
    with pytest.raises(ValueError, match="even number"):
        geglu(x, w[:-1], b[:-1])
    with pytest.raises(ValueError, match="features"):
        geglu(x[:, :8], w, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        geglu(x, w, b[:4])
    with pytest.raises(ValueError, match="2-D"):
        geglu(x, w[None], b)
    with pytest.raises(TypeError):
        geglu(x, w, 3.0)


def test_torch_compile_fullgraph_no_graph_break(device):
    x, w, b = _inputs((2, 7), 40, 24, torch.float32, device)

    def f(x, w, b):
        return geglu(x, w, b).square()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b)
    grads = torch.autograd.grad(out.sum(), (x, w, b))
    ref = f(x, w, b)
    ref_grads = torch.autograd.grad(ref.sum(), (x, w, b))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


# ---------------------------------------------------------------------------------------------- module
def test_fused_geglu_is_a_drop_in_for_diffusers_geglu(device):
    ref = DiffusersGEGLU(24, 40).to(device)
    fused = FusedGEGLU.from_diffusers(ref)
    assert fused.proj is ref.proj  # parameters shared, not copied
    assert list(fused.state_dict()) == list(ref.state_dict()) == ["proj.weight", "proj.bias"]
    fresh = FusedGEGLU(24, 40).to(device)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    fresh.load_state_dict(ref.state_dict())

    x = random_tensor((2, 9, 24), device=device, requires_grad=True)
    out, want = fused(x), ref(x)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(fresh(x), want, rtol=2e-5, atol=2e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, ref.proj.weight, ref.proj.bias], grad)
    exp = torch.autograd.grad(want, [x, ref.proj.weight, ref.proj.bias], grad)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)

    nobias = FusedGEGLU.from_diffusers(DiffusersGEGLU(16, 8, bias=False))
    assert nobias.proj.bias is None and nobias(random_tensor((3, 16))).shape == (3, 8)


def test_from_diffusers_refuses_what_it_cannot_replace():
    ref = DiffusersGEGLU(16, 8)
    ref.proj.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="hooks"):
        FusedGEGLU.from_diffusers(ref)
    with pytest.raises(TypeError, match="nn.Linear"):
        FusedGEGLU.from_diffusers(torch.nn.Identity())
    odd = DiffusersGEGLU(16, 8)
    odd.proj = torch.nn.Linear(16, 15)
    with pytest.raises(ValueError, match="even"):
        FusedGEGLU.from_diffusers(odd)


def test_custom_ops_pass_opcheck(device):
    x, w, b = _inputs((5,), 16, 16, torch.float32, device)
    torch.library.opcheck(torch.ops.nitrokernels.geglu_fwd.default, (x, w, b, True))
    torch.library.opcheck(torch.ops.nitrokernels.geglu_fwd.default, (x.detach(), w.detach(), None, False))
    torch.library.opcheck(torch.ops.nitrokernels.geglu_bwd_act.default,
                          (torch.randn(5, 16, device=device), torch.randn(5, 32, device=device)))
