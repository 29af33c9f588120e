"""nitrokernels.ops.layer_norm: torch's fused kernel behind the op name (no Triton backend; see the module)."""
import pytest
import torch

from nitrokernels.ops.layer_norm import LAYER_NORM, layer_norm
from nitrokernels.ops.reference import layer_norm_reference
from nitrokernels.testing import assert_close_to_reference, random_tensor, to_reference


@pytest.mark.parametrize("shape,normalized", [((2, 7, 40), (40,)), ((3, 5, 6), (5, 6)), ((11, 33), 33)])
def test_matches_fp64_reference(shape, normalized, device):
    x = random_tensor(shape, device=device, requires_grad=True, scale=2.0, offset=0.5)
    tail = (normalized,) if isinstance(normalized, int) else normalized
    w = random_tensor(tail, device=device, requires_grad=True)
    b = random_tensor(tail, device=device, requires_grad=True)
    out = layer_norm(x, normalized, w, b, 1e-5)
    ref_in = to_reference((x, w, b))
    ref = layer_norm_reference(ref_in[0], normalized, ref_in[1], ref_in[2], 1e-5)
    assert_close_to_reference(out, ref)
    grad = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (x, w, b), grad), torch.autograd.grad(ref, ref_in, grad.double())):
        assert_close_to_reference(g, r)


def test_only_torch_backend_and_errors():
    assert set(LAYER_NORM.impls) == {"eager"}
    with pytest.raises(ValueError, match="normalized_shape"):
        layer_norm(torch.randn(2, 3), (4,))


def test_compile_fullgraph():
    x = torch.randn(2, 3, 8)
    out = torch.compile(lambda t: layer_norm(t, 8), fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (8,)))
