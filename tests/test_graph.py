"""graphed(): CUDA-graph capture / replay / re-capture, and the refusals (CPU ones run everywhere)."""
import pytest
import torch
from torch import nn

import nitrokernels as nk
from nitrokernels.graph import GraphedModule

HAS_CUDA = torch.cuda.is_available()


class Toy(nn.Module):
    """Two inputs (one nested in a dict, like SDXL's added_cond_kwargs), a constant, a structured output."""

    def __init__(self, dim=16):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, cond=None, scale=1.0):
        h = self.norm(self.lin(x)) * scale
        if cond is not None:
            h = h + cond["bias"]
        return {"out": h, "aux": (h.sum(-1),)}


# ------------------------------------------------------------------------------------ CPU refusals
def test_refuses_cpu_module():
    with pytest.raises(RuntimeError, match="CUDA"):
        nk.graphed(Toy(), x=torch.randn(2, 16))


def test_refuses_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        nk.graphed(lambda x: x)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
def test_refuses_without_gpu_even_for_parameterless_module():
    with pytest.raises(RuntimeError, match="is_available"):
        GraphedModule(nn.ReLU())


# -------------------------------------------------------------------------------------------- GPU
def _inputs(batch=4, dim=16, device="cuda"):
    return dict(x=torch.randn(batch, dim, device=device), cond={"bias": torch.randn(dim, device=device)})


@pytest.mark.gpu
def test_capture_replay_matches_eager_and_reuses_graph():
    model = Toy().cuda().eval()
    first = _inputs()
    g = nk.graphed(model, **first)  # captured now
    assert g.captures == 1
    for _ in range(3):
        inputs = _inputs()
        with torch.no_grad():
            ref = model(**inputs)
            out = g(**inputs)
        torch.testing.assert_close(out["out"], ref["out"])
        torch.testing.assert_close(out["aux"][0], ref["aux"][0])
    assert g.captures == 1 and g.num_graphs == 1


@pytest.mark.gpu
def test_new_shape_dtype_or_constant_recaptures_and_cache_is_bounded():
    model = Toy().cuda().eval()
    g = nk.graphed(model, max_graphs=2)
    with torch.no_grad():
        g(**_inputs(batch=4))
        g(**_inputs(batch=4))
        assert g.captures == 1
        g(**_inputs(batch=3))                       # new shape
        assert g.captures == 2
        out = g(**_inputs(batch=4))                 # old shape: still cached
        assert g.captures == 2 and out["out"].shape == (4, 16)
        inputs = _inputs(batch=4)
        ref = model(**inputs, scale=0.5)
        torch.testing.assert_close(g(**inputs, scale=0.5)["out"], ref["out"])  # new constant -> new graph
        assert g.captures == 3 and g.num_graphs == 2  # least recently used (batch 3) evicted
        g(**_inputs(batch=3))
        assert g.captures == 4
        half = Toy().cuda().eval().half()
        gh = nk.graphed(half)
        x = torch.randn(2, 16, device="cuda", dtype=torch.half)
        torch.testing.assert_close(gh(x)["out"], half(x)["out"])


@pytest.mark.gpu
def test_positional_arguments():
    model = nn.Linear(8, 8).cuda().eval()
    g = nk.graphed(model, torch.randn(5, 8, device="cuda"))
    x = torch.randn(5, 8, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(g(x), model(x))


@pytest.mark.gpu
def test_clone_outputs_false_returns_the_static_buffer():
    model = Toy().cuda().eval()
    g = nk.graphed(model, clone_outputs=False)
    with torch.no_grad():
        a = g(**_inputs())["out"]
        a_values = a.clone()
        b = g(**_inputs())["out"]
    assert a.data_ptr() == b.data_ptr()            # the same buffer ...
    assert not torch.equal(a, a_values)            # ... overwritten by the next replay, as documented
    cloned = nk.graphed(model)
    with torch.no_grad():
        c = cloned(**_inputs())["out"]
        d = cloned(**_inputs())["out"]
    assert c.data_ptr() != d.data_ptr() and not torch.equal(c, d)


@pytest.mark.gpu
def test_refusals_on_gpu():
    model = Toy().cuda()
    g = nk.graphed(model)
    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        g(**_inputs())
    model.eval()
    x = torch.randn(4, 16, device="cuda", requires_grad=True)
    with pytest.raises(RuntimeError, match="argument 'x' requires grad"):
        g(x=x)
    with pytest.raises(RuntimeError, match="argument 'cond'.*cpu"):
        g(x=torch.randn(4, 16, device="cuda"), cond={"bias": torch.randn(16)})
    with torch.no_grad():
        with pytest.raises(TypeError, match="not hashable"):
            g(x=torch.randn(4, 16, device="cuda"), scale={1.0})
        g(**_inputs())
        model.half()                                 # parameters move to new memory
        with pytest.raises(RuntimeError, match="reset"):
            g(**_inputs())
        g.reset()
        x = torch.randn(4, 16, device="cuda", dtype=torch.half)
        torch.testing.assert_close(g(x=x)["out"], model(x=x)["out"])
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        nk.graphed(nn.ReLU())(torch.randn(3))


@pytest.mark.gpu
def test_sees_in_place_parameter_updates():
    model = nn.Linear(8, 8).cuda().eval()
    x = torch.randn(3, 8, device="cuda")
    g = nk.graphed(model, x)
    with torch.no_grad():
        model.weight.mul_(2)
        torch.testing.assert_close(g(x), model(x))


@pytest.mark.gpu
def test_graphed_patched_unet_matches_eager():
    pytest.importorskip("diffusers")
    from test_patch import make_inputs, make_unet

    unet = make_unet("sdxl").cuda().eval()
    inputs = {k: (v.cuda() if torch.is_tensor(v) else {kk: vv.cuda() for kk, vv in v.items()})
              for k, v in make_inputs("sdxl", batch=1).items()}
    with torch.no_grad():
        ref = unet(**inputs).sample
        with nk.patch_unet(unet):
            g = nk.graphed(unet, **inputs)
            out = g(**inputs).sample
            fresh = {k: (torch.randn_like(v) if torch.is_tensor(v) and v.is_floating_point() else v)
                     for k, v in inputs.items()}
            out2 = g(**fresh).sample
            ref2 = unet(**fresh).sample
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out2, ref2, rtol=2e-3, atol=2e-3)
