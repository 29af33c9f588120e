"""The backend dispatcher: preference order, reasons, forcing by env var and context manager."""
import pytest
import torch

from nitrokernels.ops import dispatch
from nitrokernels.ops.dispatch import BackendUnavailable, DispatchedOp, use_backend


def _make_op(name="toy_op"):
    op = DispatchedOp(name)
    op.register("triton", check=lambda x: [] if x.shape[-1] % 2 == 0 else ["last dim must be even"])(
        lambda x: ("triton", x * 2))
    op.register("eager")(lambda x: ("eager", x * 2))
    dispatch.REGISTRY[name] = op
    return op


@pytest.fixture
def toy_op():
    op = _make_op()
    yield op
    dispatch.REGISTRY.pop(op.name)


def test_prefers_first_backend_that_applies(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert toy_op(torch.randn(3, 4))[0] == "triton"
    assert toy_op(torch.randn(3, 5))[0] == "eager"


def test_explain_names_the_reason(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reasons = toy_op.explain(torch.randn(3, 5))
    assert reasons["triton"] == ["last dim must be even"]
    assert reasons["eager"] == []
    assert reasons["cuda_ext"] == ["not implemented for this op"]


def test_cpu_tensors_need_the_interpreter_for_triton(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = toy_op.explain(torch.randn(2, 4))["triton"]
    assert any("TRITON_INTERPRET" in r for r in reasons)
    assert toy_op(torch.randn(2, 4))[0] == "eager"


def test_context_manager_forces_and_restores(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 4)
    with use_backend("eager"):
        assert toy_op(x)[0] == "eager"
        with use_backend("triton", "toy_op"):
            assert toy_op(x)[0] == "triton"
        assert toy_op(x)[0] == "eager"
    assert toy_op(x)[0] == "triton"


def test_forced_backend_that_cannot_run_raises_with_reasons(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with use_backend("triton"), pytest.raises(BackendUnavailable, match="last dim must be even"):
        toy_op(torch.randn(2, 5))
    with use_backend("cuda_ext"), pytest.raises(BackendUnavailable, match="no such implementation"):
        toy_op(torch.randn(2, 4))


def test_env_var_forces_globally_and_per_op(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 4)
    monkeypatch.setenv("NITROKERNELS_BACKEND", "eager")
    assert toy_op(x)[0] == "eager"
    monkeypatch.setenv("NITROKERNELS_BACKEND", "other_op=eager, toy_op=eager")
    assert toy_op(x)[0] == "eager"
    monkeypatch.setenv("NITROKERNELS_BACKEND", "other_op=eager")
    assert toy_op(x)[0] == "triton"


def test_bad_forcing_is_refused_clearly(toy_op, monkeypatch):
    monkeypatch.setenv("NITROKERNELS_BACKEND", "toy_op=cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        toy_op(torch.randn(2, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="unknown op"):
        with use_backend("eager", "no_such_op"):
            pass


def test_no_backend_applies_lists_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    op = DispatchedOp("lonely")
    op.register("triton")(lambda x: x)
    with pytest.raises(BackendUnavailable, match="triton"):
        op(torch.randn(2))


def test_debug_log_says_why_backends_were_skipped(toy_op, monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with caplog.at_level("DEBUG", logger="nitrokernels"):
        toy_op(torch.randn(2, 3))
    assert "using eager" in caplog.text and "last dim must be even" in caplog.text


def test_select_traced_under_torch_compile_follows_the_same_rule(monkeypatch):
    """Inside torch.compile the backend is chosen at trace time (select_traced): the same preference, forcing
    and reasons as eager dispatch, with no graph break from reading the forcing state."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op = DispatchedOp("toy_traced")
    op.register("triton", check=lambda x: [] if x.shape[-1] % 2 == 0 else ["last dim must be even"])(
        lambda x: x * 2)
    op.register("eager")(lambda x: x * 3)
    dispatch.REGISTRY[op.name] = op
    try:
        def f(x):
            return op.select_traced(x).fn(x) + 1

        def run(x):
            torch._dynamo.reset()  # forcing is a trace-time constant: a new trace per setting
            return torch.compile(f, fullgraph=True, backend="eager")(x)

        even, odd = torch.ones(2, 4), torch.ones(2, 5)
        assert torch.equal(run(even), even * 2 + 1)           # triton preferred
        assert torch.equal(run(odd), odd * 3 + 1)             # triton refuses odd sizes -> eager
        with use_backend("eager", "toy_traced"):
            assert torch.equal(run(even), even * 3 + 1)
        with use_backend("triton"), pytest.raises(Exception, match="last dim must be even"):
            run(odd)
    finally:
        dispatch.REGISTRY.pop(op.name)
