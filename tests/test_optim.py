"""SampledAdamW (nitrokernels.optim) and its op nitrokernels.ops.optim.sampled_adamw_.

The reference for a row that received gradients in k of the optimiser's steps is torch.optim.AdamW run on
that row alone for those k steps (per-row step counters), with repeated sparse indices summed.
"""
import copy

import pytest
import torch

from nitrokernels import _ext
from nitrokernels.ops.dispatch import use_backend
from nitrokernels.ops.optim import sampled_adamw_
from nitrokernels.optim import SampledAdamW

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["eager"] + (["cuda_ext"] if HAS_CUDA and _ext.extension_available() else [])
DEVICE = "cuda" if HAS_CUDA else "cpu"
HYPER = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3)


def sparse_rows(rows, values, shape):
    rows = torch.as_tensor(rows, device=values.device)
    return torch.sparse_coo_tensor(rows[None], values, shape, check_invariants=False)


def make_params(shapes, dtype, device=DEVICE):
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device)) for s in shapes]


SHAPES = [(5, 3, 2, 4, 4), (5, 3), (5, 1), (7,)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sparse", [True, False])
def test_matches_torch_adamw_when_every_row_has_a_gradient(backend, dtype, sparse):
    ours = make_params(SHAPES, dtype)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = SampledAdamW(ours, **HYPER)
    ref = torch.optim.AdamW(theirs, **HYPER, foreach=False)
    for _ in range(4):
        for p, q in zip(ours, theirs):
            g = torch.randn_like(p)
            # a sparse gradient listing every row, unordered, as the head kernels produce it
            perm = torch.randperm(p.shape[0], device=p.device)
            p.grad = sparse_rows(perm, g[perm], p.shape) if sparse else g.clone()
            q.grad = g.clone()
        with use_backend(backend, "sampled_adamw"):
            opt.step()
        ref.step()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=tol, atol=tol)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=tol, atol=tol)
        assert (opt.state[p]["step"] == 4).all()


def _row_reference(initial, grads_per_step, row, dtype):
    """torch AdamW on one row alone, stepping only when the row had gradient entries (summed)."""
    q = torch.nn.Parameter(initial[row].detach().clone().to(dtype))
    ref = torch.optim.AdamW([q], **HYPER, foreach=False)
    for entries in grads_per_step:
        present = [v for r, v in entries if r == row]
        if not present:
            continue
        q.grad = torch.stack(present).sum(0).to(dtype)
        ref.step()
    return q.detach(), ref.state[q] if ref.state[q] else None


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_rows_only_with_per_row_bias_correction(backend):
    dtype = torch.float64
    params = make_params([(9, 4, 3), (9, 4)], dtype)
    initial = [p.detach().clone() for p in params]
    opt = SampledAdamW(params, **HYPER)
    history = [[] for _ in params]  # per param, per step: [(row, grad_row), ...]
    steps = [[4, 1, 4, 4, 7], [1, 2], [8, 1, 1, 8, 0, 4]]  # repeats and unordered on purpose
    for rows in steps:
        for i, p in enumerate(params):
            values = torch.randn(len(rows), *p.shape[1:], dtype=dtype, device=p.device)
            p.grad = sparse_rows(rows, values, p.shape)
            history[i].append(list(zip(rows, values)))
        with use_backend(backend, "sampled_adamw"):
            opt.step()
    touched = sorted({r for rows in steps for r in rows})
    for i, p in enumerate(params):
        for row in range(p.shape[0]):
            if row not in touched:
                assert torch.equal(p.detach()[row], initial[i][row]), f"untouched row {row} changed"
                assert (opt.state[p]["exp_avg"][row] == 0).all() and opt.state[p]["step"][row] == 0
                continue
            expected, ref_state = _row_reference(initial[i], history[i], row, dtype)
            torch.testing.assert_close(p.detach()[row], expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"][row], ref_state["exp_avg_sq"])
            assert opt.state[p]["step"][row].item() == sum(row in rows for rows in steps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulated_sparse_gradients_sum(backend):
    p = make_params([(6, 5)], torch.float64)[0]
    q = torch.nn.Parameter(p.detach().clone())
    a, b = torch.randn(2, 5, dtype=p.dtype, device=p.device), torch.randn(3, 5, dtype=p.dtype, device=p.device)
    p.grad = sparse_rows([2, 5], a, p.shape) + sparse_rows([5, 2, 2], b, p.shape)  # uncoalesced sum
    dense = torch.zeros_like(p)
    dense.index_add_(0, torch.tensor([2, 5], device=p.device), a)
    dense.index_add_(0, torch.tensor([5, 2, 2], device=p.device), b)
    mask = torch.zeros(6, dtype=torch.bool, device=p.device)
    mask[[2, 5]] = True
    opt = SampledAdamW([p], **HYPER)
    with use_backend(backend, "sampled_adamw"):
        opt.step()
    q_rows = torch.nn.Parameter(q.detach()[mask].clone())
    q_rows.grad = dense[mask]
    torch.optim.AdamW([q_rows], **HYPER, foreach=False).step()
    torch.testing.assert_close(p.detach()[mask], q_rows.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(p.detach()[~mask], q.detach()[~mask])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params(backend, dtype):
    p = make_params([(4, 37)], torch.float32)[0]
    low = torch.nn.Parameter(p.detach().to(dtype))
    g = torch.randn(2, 37, device=p.device)
    p.grad = sparse_rows([3, 0], g, p.shape)
    low.grad = sparse_rows([3, 0], g.to(dtype), p.shape)
    ref_opt, opt = SampledAdamW([p], **HYPER), SampledAdamW([low], **HYPER)
    ref_opt.step()
    with use_backend(backend, "sampled_adamw"):
        opt.step()
    assert opt.state[low]["exp_avg"].dtype == dtype
    # one bf16/fp16 rounding of the inputs and of the result
    torch.testing.assert_close(low.detach().float(), p.detach(), rtol=2e-2, atol=2e-2)
    assert torch.equal(low.detach()[1:3], p.detach()[1:3].to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_rows_restarts_those_rows(backend):
    p = make_params([(5, 3)], torch.float64)[0]
    opt = SampledAdamW([p], **HYPER)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        with use_backend(backend, "sampled_adamw"):
            opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    opt.reset_rows(p, torch.tensor([1, 3], device=p.device))
    state = opt.state[p]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert (state[key][[1, 3]] == 0).all()
        assert torch.equal(state[key][[0, 2, 4]], before[key][[0, 2, 4]])
    # the next update of a reset row is a first AdamW step again (bias correction of step 1)
    start = p.detach()[1].clone()
    g = torch.randn(1, 3, dtype=p.dtype, device=p.device)
    p.grad = sparse_rows([1], g, p.shape)
    with use_backend(backend, "sampled_adamw"):
        opt.step()
    q = torch.nn.Parameter(start)
    q.grad = g[0]
    torch.optim.AdamW([q], **HYPER, foreach=False).step()
    torch.testing.assert_close(p.detach()[1], q.detach(), rtol=1e-12, atol=1e-12)
    opt.reset_rows(p, 4)  # int and list forms
    opt.reset_rows(p, [0])
    assert state["step"][0] == 0 and state["step"][4] == 0 and state["step"][2] == 3


def test_reset_rows_without_state_is_a_no_op_and_errors_are_clear():
    p, other = make_params([(4, 2), (4, 2)], torch.float32)
    opt = SampledAdamW([p])
    opt.reset_rows(p, [1])  # no state yet
    with pytest.raises(ValueError, match="not in the optimiser"):
        opt.reset_rows(other, [1])
    p.grad = torch.randn_like(p)
    opt.step()
    if p.device.type == "cpu":
        with pytest.raises(IndexError, match=r"\[0, 4\)"):
            opt.reset_rows(p, [4])


def test_bad_arguments():
    p = make_params([(4, 2)], torch.float32)[0]
    for kwargs, match in [(dict(lr=-1.0), "learning rate"), (dict(betas=(0.9, 1.0)), "betas"),
                          (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay")]:
        with pytest.raises(ValueError, match=match):
            SampledAdamW([p], **kwargs)
    scalar = torch.nn.Parameter(torch.tensor(1.0, device=p.device))
    scalar.grad = torch.tensor(1.0, device=p.device)
    with pytest.raises(ValueError, match="0-dim"):
        SampledAdamW([scalar]).step()
    two_sparse = torch.sparse_coo_tensor(torch.tensor([[0], [1]], device=p.device), torch.ones(1, device=p.device),
                                         (4, 2), check_invariants=False)
    p.grad = two_sparse
    with pytest.raises(ValueError, match="sparse_dim 1"):
        SampledAdamW([p]).step()
    state = [torch.zeros_like(p), torch.zeros_like(p), torch.zeros(4, device=p.device)]
    with pytest.raises(TypeError, match="grad 0 has dtype"):
        sampled_adamw_([p.detach()], [torch.randn(4, 2, dtype=torch.float64, device=p.device)], *map(list, zip(state)),
                       lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="steps 0 must be float32"):
        sampled_adamw_([p.detach()], [torch.randn_like(p)], [state[0]], [state[1]], [torch.zeros(3, device=p.device)],
                       lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)


def test_state_dict_round_trip():
    p = make_params([(4, 3)], torch.float32)[0]
    opt = SampledAdamW([p], **HYPER)
    p.grad = sparse_rows([2], torch.randn(1, 3, device=p.device), p.shape)
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = SampledAdamW([q], **HYPER)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() holds references
    g = sparse_rows([2, 0], torch.randn(2, 3, device=p.device), p.shape)
    p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p.detach(), q.detach())
    assert torch.equal(opt.state[p]["step"], opt2.state[q]["step"])


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and _ext.extension_available()), reason="needs the CUDA extension")
def test_cuda_kernel_matches_eager_on_many_tensors_and_long_rows():
    # more tensors than one launch holds (24), rows longer than one block's chunk, mixed dtypes, repeats
    shapes = [(6, 3 + i, 5) for i in range(30)] + [(4, 256, 320, 4, 4), (4, 1)]
    dtypes = [torch.float32, torch.bfloat16, torch.float64]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtypes[i % 3])) for i, s in enumerate(shapes)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused, eager = SampledAdamW(params, **HYPER), SampledAdamW(twins, **HYPER)
    for rows in ([3, 0, 3, 3, 1], [2], [0, 1, 2, 3]):
        for p, q in zip(params, twins):
            values = torch.randn(len(rows), *p.shape[1:], device="cuda", dtype=p.dtype)
            p.grad = sparse_rows(rows, values, p.shape)
            q.grad = p.grad.clone()
        with use_backend("cuda_ext", "sampled_adamw"):
            fused.step()
        with use_backend("eager", "sampled_adamw"):
            eager.step()
    for p, q in zip(params, twins):
        tol = 1e-2 if p.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol, atol=tol)
        assert torch.equal(fused.state[p]["step"], eager.state[q]["step"])
