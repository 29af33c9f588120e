"""SampledAdamW (nitrokernels.optim) and its op nitrokernels.ops.optim.sampled_adamw_.

The reference for a row that received gradients in k of the optimiser's steps is torch.optim.AdamW run on
that row alone for those k steps (per-row step counters), with repeated sparse indices summed.
"""
import contextlib
import copy
import os
import sys

import pytest
import torch

import nitrokernels.ops.optim as optim_ops
from nitrokernels import _ext
from nitrokernels.ops.dispatch import use_backend
from nitrokernels.ops.optim import sampled_adamw_
from nitrokernels.optim import SampledAdamW

HAS_CUDA = torch.cuda.is_available()
# "cuda_emu": csrc/heads/sampled_adamw.cu's kernels run on the CPU thread by thread (tests/cuda_emulation.py)
BACKENDS = ["eager"] + (["cuda_ext"] if HAS_CUDA and _ext.extension_available() else []) + \
    ([] if HAS_CUDA else ["cuda_emu"])
DEVICE = "cuda" if HAS_CUDA else "cpu"
HYPER = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3)
CU_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "heads",
                         "sampled_adamw.cu")


def _emulated_ops():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cuda_emulation

    reason = cuda_emulation.available()
    if reason:
        pytest.skip(f"CUDA emulation unavailable: {reason}")
    namespace = cuda_emulation.default_namespace(CU_SOURCE)
    if not hasattr(getattr(torch.ops, namespace), "sampled_adamw_"):
        torch.ops.load_library(cuda_emulation.build(CU_SOURCE))
    return getattr(torch.ops, namespace)


@contextlib.contextmanager
def backend_of(backend):
    """use_backend, plus "cuda_emu": the eager backend's reference replaced by the emulated CUDA kernels, fed
    exactly what the cuda_ext backend feeds the real ones (ops.optim.kernel_arguments)."""
    if backend != "cuda_emu":
        with use_backend(backend, "sampled_adamw"):
            yield
        return
    ops = _emulated_ops()

    def run(params, grads, exp_avgs, exp_avg_sqs, steps, masters=None, *, lr, beta1, beta2, eps, weight_decay):
        values, rows, perms = optim_ops.kernel_arguments(params, grads)
        masters = [None] * len(params) if masters is None else list(masters)
        ops.sampled_adamw_(list(params), values, rows, perms, list(exp_avgs), list(exp_avg_sqs), list(steps),
                           masters, lr, beta1, beta2, eps, weight_decay)

    saved = optim_ops.sampled_adamw_reference_
    optim_ops.sampled_adamw_reference_ = run
    try:
        with use_backend("eager", "sampled_adamw"):
            yield
    finally:
        optim_ops.sampled_adamw_reference_ = saved


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
        with backend_of(backend):
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
        with backend_of(backend):
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
    with backend_of(backend):
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
    with backend_of(backend):
        opt.step()
    assert opt.state[low]["exp_avg"].dtype == torch.float32 and opt.state[low]["master"].dtype == torch.float32
    # one bf16/fp16 rounding of the inputs and of the result
    torch.testing.assert_close(low.detach().float(), p.detach(), rtol=2e-2, atol=2e-2)
    assert torch.equal(low.detach()[1:3], p.detach()[1:3].to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_rows_restarts_those_rows(backend):
    p = make_params([(5, 3)], torch.float64)[0]
    opt = SampledAdamW([p], **HYPER)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        with backend_of(backend):
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
    with backend_of(backend):
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


# ======================================================= fp32 state: small updates of 16-bit params survive
def _small_update_run(backend, steps=60, lr=1e-5):
    """A bf16 pool row of |w| ~ 0.007 trained at lr 1e-5 with fixed-sign gradients, beside the same optimiser on
    an fp32 copy fed the same (bf16) gradients: (bf16 param, its optimiser, fp32 param, its optimiser, start)."""
    g = torch.Generator().manual_seed(0)
    start = (0.007 * (1 + torch.rand(3, 64, generator=g)) * torch.sign(torch.randn(3, 64, generator=g)))
    low = torch.nn.Parameter(start.to(DEVICE, torch.bfloat16))
    ref = torch.nn.Parameter(low.detach().float().clone())
    hyper = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt, ref_opt = SampledAdamW([low], **hyper), SampledAdamW([ref], **hyper)
    signs = torch.sign(torch.randn(2, 64, generator=g)).to(DEVICE)
    for i in range(steps):
        grad = (signs * (0.5 + torch.rand(2, 64, generator=g).to(DEVICE))).to(torch.bfloat16)
        low.grad = sparse_rows([2, 0], grad, low.shape)
        ref.grad = sparse_rows([2, 0], grad.float(), ref.shape)
        with backend_of(backend):
            opt.step()
        with use_backend("eager", "sampled_adamw"):
            ref_opt.step()
    return low, opt, ref, ref_opt, start.to(DEVICE, torch.bfloat16)


def assert_moves_like_fp32_master(low, opt, ref, ref_opt, start):
    state, ref_state = opt.state[low], ref_opt.state[ref]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state[key].float(), ref_state[key], rtol=1e-6, atol=0, msg=key)
    # the master holds the fp32 trajectory; the parameter is its rounding
    torch.testing.assert_close(state["master"], ref.detach(), rtol=1e-6, atol=0)
    assert torch.equal(low.detach(), ref.detach().to(torch.bfloat16))
    moved = (ref.detach()[[0, 2]] - start[[0, 2]].float()).abs().mean()
    assert moved > 3e-4, f"the fp32 reference moved only {moved}"          # ~60 steps x lr 1e-5 -> ~6e-4
    assert not torch.equal(low.detach()[[0, 2]], start[[0, 2]]), "no bf16 weight moved"
    assert torch.equal(low.detach()[1], start[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_params_at_lr_1e5_move_as_fp32_master_math(backend):
    assert_moves_like_fp32_master(*_small_update_run(backend))


def test_bf16_state_would_lose_the_updates(monkeypatch):
    """The check above fails on the former design (moments in the param's dtype, no master rows): each update
    (~1e-5) is below half a bf16 ulp of |w| ~ 0.007 (~3e-5) and rounds away."""
    for module in (optim_ops, sys.modules["nitrokernels.optim"]):
        monkeypatch.setattr(module, "state_dtype", lambda dtype: dtype)
        monkeypatch.setattr(module, "needs_master", lambda dtype: False)
    low, opt, ref, ref_opt, start = _small_update_run("eager")
    assert opt.state[low]["exp_avg"].dtype == torch.bfloat16 and "master" not in opt.state[low]
    assert torch.equal(low.detach(), start)                     # not a single weight moved in 60 steps
    with pytest.raises(AssertionError):
        assert_moves_like_fp32_master(low, opt, ref, ref_opt, start)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_rows_sum_in_entry_order(backend):
    """Repeated rows are summed sequentially in entry order (fp32): 1e8 + (-1e8) + 1 = 1, whereas any order that
    adds the 1 before cancelling gives 0. The rows are interleaved so only a stable sort keeps the order."""
    p = torch.nn.Parameter(torch.zeros(3, 4, device=DEVICE))
    big = torch.full((4,), 1e8, device=DEVICE)
    values = torch.stack([big, torch.full((4,), 5.0, device=DEVICE), -big, torch.ones(4, device=DEVICE)])
    p.grad = sparse_rows([2, 0, 2, 2], values, p.shape)
    opt = SampledAdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    with backend_of(backend):
        opt.step()
    torch.testing.assert_close(opt.state[p]["exp_avg"][2], torch.full((4,), 0.1, device=DEVICE))  # (1 - b1) * 1
    torch.testing.assert_close(opt.state[p]["exp_avg"][0], torch.full((4,), 0.5, device=DEVICE))
    assert (opt.state[p]["step"] == torch.tensor([1.0, 0.0, 1.0], device=DEVICE)).all()


def test_eager_sum_helper_order_and_counts():
    rows = torch.tensor([3, 1, 3, 3, 1])
    values = torch.tensor([[1e8], [2.0], [-1e8], [1.0], [3.0]])
    uniq, total = optim_ops.sum_rows_in_order(rows, values, torch.float32)
    assert uniq.tolist() == [1, 3] and total.view(-1).tolist() == [5.0, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_and_outside_writes_resync_the_master(backend):
    p = torch.nn.Parameter(torch.randn(4, 8, device=DEVICE).to(torch.bfloat16))
    opt = SampledAdamW([p], lr=1e-3)
    for _ in range(2):
        p.grad = sparse_rows([0, 1, 2], torch.randn(3, 8, device=DEVICE).to(torch.bfloat16), p.shape)
        with backend_of(backend):
            opt.step()
    state = opt.state[p]
    with torch.no_grad():      # a refresh re-initialises row 1 (then resets it), row 2 is written with no reset
        p[1] = torch.randn(8, device=DEVICE).to(torch.bfloat16)
        p[2] = torch.randn(8, device=DEVICE).to(torch.bfloat16)
    opt.reset_rows(p, [1])
    assert torch.equal(state["master"][1], p.detach()[1].float()) and state["step"][1] == 0
    row2 = p.detach()[2].float().clone()
    g = torch.randn(1, 8, device=DEVICE).to(torch.bfloat16)
    p.grad = sparse_rows([2], g, p.shape)
    with backend_of(backend):
        opt.step()
    # row 2 stepped from the value written into p, not from the stale master
    assert (state["master"][2] - row2).abs().max() < 5 * 1e-3


def test_state_dict_round_trip_keeps_fp32_state_of_bf16_params():
    p = torch.nn.Parameter(torch.randn(4, 6).to(torch.bfloat16))
    opt = SampledAdamW([p], lr=1e-5)
    p.grad = sparse_rows([1, 3], torch.randn(2, 6).to(torch.bfloat16), p.shape)
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = SampledAdamW([q], lr=1e-5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key in ("exp_avg", "exp_avg_sq", "master", "step"):
        assert opt2.state[q][key].dtype == torch.float32
        assert torch.equal(opt2.state[q][key], opt.state[p][key]), key
    g = sparse_rows([3, 0], torch.randn(2, 6).to(torch.bfloat16), p.shape)
    p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p.detach(), q.detach()) and torch.equal(opt.state[p]["master"], opt2.state[q]["master"])


def test_loads_a_state_dict_with_16_bit_moments():
    """The former state form (moments in the param's dtype, no master): moments upcast, master from the param."""
    p = torch.nn.Parameter(torch.randn(4, 6).to(torch.bfloat16))
    opt = SampledAdamW([p], lr=1e-3)
    p.grad = sparse_rows([1], torch.randn(1, 6).to(torch.bfloat16), p.shape)
    opt.step()
    old = copy.deepcopy(opt.state_dict())
    for st in old["state"].values():
        st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].to(torch.bfloat16), st["exp_avg_sq"].to(torch.bfloat16)
        del st["master"]
    opt2 = SampledAdamW([p], lr=1e-3)
    opt2.load_state_dict(old)
    state = opt2.state[p]
    assert state["exp_avg"].dtype == torch.float32 and torch.equal(state["master"], p.detach().float())
    p.grad = sparse_rows([1], torch.randn(1, 6).to(torch.bfloat16), p.shape)
    opt2.step()
    assert state["step"][1] == 2


@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 1.0])
@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_clip_grad_norm_mixes_dense_and_sparse_gradients(norm_type, max_norm):
    """nitrokernels.optim.clip_grad_norm_ equals torch's on the densified gradients: same total norm, same
    clipped gradients; sparse rows repeat (their sum is the gradient), and the sparse layout is kept."""
    from nitrokernels.optim import clip_grad_norm_

    torch.manual_seed(0)
    dense_p = torch.nn.Parameter(torch.randn(3, 4))
    sparse_p = torch.nn.Parameter(torch.randn(6, 2, 2))
    dense_p.grad = torch.randn(3, 4)
    rows = torch.tensor([[4, 1, 4, 0]])
    sparse_p.grad = torch.sparse_coo_tensor(rows, torch.randn(4, 2, 2), (6, 2, 2), check_invariants=True)   # 4 twice
    ref = [torch.nn.Parameter(p.detach().clone()) for p in (dense_p, sparse_p)]
    ref[0].grad, ref[1].grad = dense_p.grad.clone(), sparse_p.grad.to_dense()
    expected = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    total = clip_grad_norm_([dense_p, sparse_p], max_norm, norm_type)
    torch.testing.assert_close(total, expected)
    assert sparse_p.grad.is_sparse
    torch.testing.assert_close(dense_p.grad, ref[0].grad)
    torch.testing.assert_close(sparse_p.grad.to_dense(), ref[1].grad)
    with pytest.raises(RuntimeError, match="sparse|Sparse"):
        torch.nn.utils.clip_grad_norm_([sparse_p], 1.0)       # what torch does (the reason this exists)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([dense_p], 0.0)
