"""HeadPool (nitrokernels.nn.HeadPool) against the eager loop over `as_module` heads in float64.

Forward logits, feature gradients and the sparse gradients of the sampled heads' pooled weights are compared
with each backend of nitrokernels.ops.head_stack forced (Triton under its CPU interpreter: small shapes).
"""
import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import nitrokernels.nn.head_pool as head_pool_module
from nitrokernels.nn.head_pool import SDXL_LEVELS, HeadPool, HeadSample
from nitrokernels.ops.dispatch import use_backend
from nitrokernels.optim import SampledAdamW
from nitrokernels.testing import assert_close_to_reference, assert_graph_capturable, random_tensor

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BACKENDS = ["triton", "eager"]


# --------------------------------------------------------------------------------------------- helpers
def make_features(pool, batch, dtype=torch.float32, channels_last=False):
    return [random_tensor((batch, c, s, s), dtype=dtype, device=pool.device, channels_last=channels_last,
                          requires_grad=True) for c, s in pool.levels]


def module_params(pool, module, level):
    """{(name, depth): tensor} of an as_module Sequential, keyed like the pool's tensors."""
    layers = list(module.children())
    out = {}
    for d in range(pool.depths[level]):
        conv, norm = layers[3 * d], layers[3 * d + 1]
        out[("conv_weight", d)], out[("conv_bias", d)] = conv.weight, conv.bias
        out[("norm_weight", d)], out[("norm_bias", d)] = norm.weight, norm.bias
    out[("final_weight", None)], out[("final_bias", None)] = layers[-1].weight, layers[-1].bias
    return out


def pool_tensor(pool, level, name, depth):
    heads = pool.pools[level]
    return getattr(heads, name)[depth] if depth is not None else getattr(heads, name)


def loop_reference(pool, features, ids, grad_out):
    """fp64 loop over as_module heads: logits, feature grads, {head_id: {key: grad}} (repeats summed)."""
    feats = [f.detach().double().requires_grad_(True) for f in features]
    outs, modules = [], {}
    for head in ids.tolist():
        level = head // pool.heads_per_level
        if head not in modules:
            modules[head] = pool.as_module(head).double()
        y = modules[head](feats[level])  # [B, 1, 1, 1] or [B, 1, s, s]
        outs.append(y[:, 0, 0, 0] if pool.kind == "global" else y[:, 0])
    out = torch.stack(outs)
    out.backward(grad_out.double())
    param_grads = {head: {key: p.grad for key, p in module_params(pool, m, head // pool.heads_per_level).items()}
                   for head, m in modules.items()}
    return out.detach(), [f.grad for f in feats], param_grads


def check_against_loop(pool, features, ids, name):
    out = pool(features, ids)
    assert out.shape == pool.output_shape(len(ids), features[0].shape[0]), name
    grad_out = torch.randn_like(out)
    ref_out, ref_feat_grads, ref_param_grads = loop_reference(pool, features, ids, grad_out)
    assert_close_to_reference(out, ref_out, name=f"{name}: logits")
    grads = torch.autograd.grad(out, features + list(pool.parameters()), grad_out, allow_unused=True)
    feat_grads, param_grads = grads[:len(features)], dict(zip([n for n, _ in pool.named_parameters()],
                                                             grads[len(features):]))
    used_levels = {h // pool.heads_per_level for h in ids.tolist()}
    for level, (g, ref) in enumerate(zip(feat_grads, ref_feat_grads)):
        if level in used_levels:
            assert_close_to_reference(g, ref, name=f"{name}: grad of features[{level}]")
        else:
            assert g is None or (g == 0).all(), f"{name}: features[{level}] is unused but got a gradient"
    sampled = set(ids.tolist())
    for level in range(len(pool.levels)):
        keys = list(module_params(pool, pool.as_module(level * pool.heads_per_level), level))
        for name_, depth in keys:
            pname = f"pools.{level}.{name_}" + (f".{depth}" if depth is not None else "")
            g = param_grads[pname]
            heads_here = sorted(h for h in sampled if h // pool.heads_per_level == level)
            if not heads_here:
                assert g is None or (g._nnz() == 0 if g.is_sparse else (g == 0).all()), \
                    f"{name}: {pname} of an unsampled level got a gradient"
                continue
            assert g is not None and g.is_sparse, f"{name}: {pname} should get a sparse COO gradient"
            g = g.coalesce()
            rows = sorted(g.indices()[0].tolist())
            assert rows == [h - level * pool.heads_per_level for h in heads_here], \
                f"{name}: {pname} gradient rows {rows} != sampled rows"
            dense = g.to_dense().to(features[0].dtype)  # the op computes in the features' dtype
            if name_ == "conv_weight":                   # the pool's [P, 4, 4, I, O] -> torch's [P, O, I, 4, 4]
                dense = dense.permute(0, 4, 3, 1, 2)
            for head in heads_here:
                assert_close_to_reference(dense[head - level * pool.heads_per_level],
                                          ref_param_grads[head][(name_, depth)],
                                          name=f"{name}: grad of {pname} row of head {head}")


# --------------------------------------------------------------------------------- forward / backward
CASES = {
    # name: (levels, heads_per_level, hidden, num_groups, kind, local_size, batch, ids)
    "global-mixed-repeated-unordered": (((5, 16), (3, 8), (7, 32)), 3, 8, 4, "global", 8, 2,
                                        [7, 0, 4, 4, 2, 8, 0]),
    "local-two-levels": (((5, 16), (3, 32)), 2, 6, 3, "local", 8, 3, [3, 1, 0, 3]),
    "one-head-batch-1": (((7, 8),), 1, 4, 2, "global", 8, 1, [0]),
    "local-size-4-one-level-used": (((3, 8), (5, 16)), 3, 4, 2, "local", 4, 2, [5, 3]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_loop_over_as_module_heads(backend, case):
    levels, P, hidden, groups, kind, local_size, batch, ids = CASES[case]
    pool = HeadPool(levels, heads_per_level=P, hidden=hidden, num_groups=groups, kind=kind,
                    local_size=local_size).to(DEVICE)
    features = make_features(pool, batch)
    with use_backend(backend, "head_stack"):
        check_against_loop(pool, features, torch.tensor(ids, device=DEVICE), f"{case}/{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("count", [(2, 0, 3), 1], ids=["per-level", "uniform"])
def test_sampled_heads_match_loop_and_need_no_regrouping(backend, count):
    pool = HeadPool(((3, 16), (5, 8), (5, 8)), heads_per_level=4, hidden=8, num_groups=2).to(DEVICE)
    features = make_features(pool, 2, channels_last=True)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids = pool.sample(count, generator=gen)   # a uniform count gives a strided view of the ids
    assert isinstance(ids, HeadSample) and ids.counts == ((2, 0, 3) if count != 1 else (1, 1, 1))
    with use_backend(backend, "head_stack"):
        check_against_loop(pool, features, ids, f"sample/{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_features_in_another_dtype_than_the_pool(backend):
    """float64 master weights, float32 features: rows gathered and cast, sparse float64 gradients."""
    pool = HeadPool(((3, 16), (5, 8)), heads_per_level=3, hidden=4, num_groups=2).double().to(DEVICE)
    features = make_features(pool, 2)
    with use_backend(backend, "head_stack"):
        check_against_loop(pool, features, torch.tensor([4, 0, 4, 2], device=DEVICE), f"mixed/{backend}")
        pool(features, pool.sample(1)).sum().backward()
    assert all(p.grad.dtype == torch.float64 and p.grad.is_sparse for p in pool.parameters())


def test_kernel_launches_do_not_grow_with_levels(monkeypatch):
    """All levels run in ONE op call: a 4-level pool (mixed depths, a level without sampled heads) launches
    the same kernels as a 1-level pool of the same greatest depth, forward and backward."""
    import nitrokernels.kernels.heads as kernels
    launched = []
    cls = type(kernels._conv_fwd_kernel)
    getitem = cls.__getitem__

    def counted(self, grid):
        launched.append(self.fn.__name__)
        return getitem(self, grid)
    monkeypatch.setattr(cls, "__getitem__", counted)
    runs = []
    for levels, counts in ((((3, 16),), (1,)), (((3, 16), (5, 8), (3, 16), (6, 8)), (1, 2, 1, 0))):
        pool = HeadPool(levels, heads_per_level=2, hidden=4, num_groups=2).to(DEVICE)
        features = [f.requires_grad_(True) for f in make_features(pool, 1)]
        launched.clear()
        with use_backend("triton", "head_stack"):
            out = pool(features, pool.sample(counts))
            forward = sorted(launched)
            launched.clear()
            out.sum().backward()
        runs.append((forward, sorted(launched)))
    # depth 2: conv + GroupNorm finish per depth, normalise+SiLU between depths, final; backward: final;
    # finish, apply, wgrad, dgrad per depth; normalise+SiLU of each deeper layer's input (its weight gradient)
    assert len(runs[0][0]) == 3 * 2 and len(runs[0][1]) == 1 + 4 * 2 + 1
    assert runs[1] == runs[0]


def test_twenty_heads_all_levels_eager():
    pool = HeadPool(((3, 16), (5, 8), (6, 16), (3, 8)), heads_per_level=6, hidden=8, num_groups=4).to(DEVICE)
    features = make_features(pool, 2)
    ids = torch.randint(0, pool.num_heads, (20,), device=DEVICE)
    with use_backend("eager", "head_stack"):
        check_against_loop(pool, features, ids, "20 heads")


def test_fast_path_does_not_sync_or_regroup(monkeypatch):
    """A HeadSample goes to ONE op call for all levels as it is (per-level counts and row offsets on the host),
    ids never copied to the host; other ids are grouped by level on the host first."""
    pool = HeadPool(((3, 8), (5, 16)), heads_per_level=3, hidden=4, num_groups=2)
    calls = []

    def fake(features, *args, **kwargs):
        ids, counts, offsets = args[6:9]
        calls.append((ids.tolist(), list(counts), list(offsets)))
        return torch.zeros(ids.numel(), features[0].shape[0])

    monkeypatch.setattr(head_pool_module, "_head_levels", fake)
    ids = HeadSample(torch.tensor([2, 0, 4, 3]), (2, 2), 3)
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: pytest.fail("host copy on the fast path"))
    pool(make_features(pool, 1), ids)
    monkeypatch.setattr(torch.Tensor, "cpu", real_cpu)
    assert calls == [([2, 0, 4, 3], [2, 2], [0, 3])]   # one call, caller's order kept
    calls.clear()
    out = pool(make_features(pool, 1), torch.tensor([4, 0, 3, 2]))  # general path: grouped, then reordered
    assert calls == [([0, 2, 4, 3], [2, 2], [0, 3])] and out.shape == (4, 1)


def test_empty_ids():
    pool = HeadPool(((3, 8),), heads_per_level=2, hidden=4, num_groups=2, kind="local", local_size=4)
    out = pool(make_features(pool, 2), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 2, 4, 4)
    assert pool(make_features(pool, 2), pool.sample(0)).shape == (0, 2, 4, 4)


# ------------------------------------------------------------------------------------------ training
def test_untouched_heads_bit_identical_after_sampled_adamw_step():
    pool = HeadPool(((3, 16), (5, 8)), heads_per_level=4, hidden=8, num_groups=4).to(DEVICE)
    before = {n: p.detach().clone() for n, p in pool.named_parameters()}
    opt = SampledAdamW(pool.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.tensor([5, 1, 5], device=DEVICE)
    with use_backend("eager", "head_stack"):
        pool(make_features(pool, 2), ids).square().sum().backward()
    opt.step()
    for name, p in pool.named_parameters():  # heads 1 and 5 are row 1 of levels 0 and 1
        changed = [r for r in range(4) if not torch.equal(p.detach()[r], before[name][r])]
        assert changed == [1], f"{name}: rows {changed} changed, expected only the sampled row 1"
        untouched = [r for r in range(4) if r != 1]
        assert (opt.state[p]["step"][untouched] == 0).all() and opt.state[p]["step"][1] == 1


def test_pool_step_equals_adamw_step_on_as_module_heads():
    """One SampledAdamW step of the pool == torch AdamW on each sampled head's as_module copy."""
    pool = HeadPool(((3, 16), (5, 8)), heads_per_level=3, hidden=4, num_groups=2, kind="local",
                    local_size=4).double().to(DEVICE)
    features = [f.detach().double() for f in make_features(pool, 2)]
    ids = torch.tensor([4, 0, 2], device=DEVICE)
    modules = {h: pool.as_module(h) for h in ids.tolist()}
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)
    opt = SampledAdamW(pool.parameters(), **hyper)
    with use_backend("eager", "head_stack"):
        pool(features, ids).sum().backward()
    opt.step()
    for h, m in modules.items():
        ref = torch.optim.AdamW(m.parameters(), **hyper, foreach=False)
        m(features[h // 3])[:, 0].sum().backward()
        ref.step()
        after = pool.as_module(h)
        for (n, a), b in zip(after.named_parameters(), m.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"head {h} {n}")


# -------------------------------------------------------------------------------- module round trip
def test_as_module_load_from_modules_round_trip():
    pool = HeadPool(((3, 16), (5, 8)), heads_per_level=2, hidden=4, num_groups=2).to(DEVICE)
    m = pool.as_module(1)
    assert [type(l).__name__ for l in m] == ["Conv2d", "GroupNorm", "SiLU"] * 2 + ["Conv2d"]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    others = {n: p.detach().clone() for n, p in pool.named_parameters()}
    pool.load_from_modules({1: m})
    back = pool.as_module(1)
    for a, b in zip(back.parameters(), m.parameters()):
        assert torch.equal(a, b)
    for name, p in pool.named_parameters():  # only row 1 of level 0 changed
        changed = [r for r in range(2) if not torch.equal(p.detach()[r], others[name][r])]
        assert changed == ([1] if name.startswith("pools.0.") else []), name
    # the same weights load into another head of the level, and behave the same
    pool.load_from_modules({0: m})
    x = make_features(pool, 2)[0].detach()
    torch.testing.assert_close(pool.as_module(0)(x), m(x))
    # a 0-d tensor id works too
    assert isinstance(pool.as_module(torch.tensor(3)), torch.nn.Sequential)


def test_loads_a_state_dict_of_the_old_conv_weight_layout():
    """State dicts from before the GEMM layout (conv weights [P, O, I, 4, 4], module version 1) load converted;
    the pool's own state dicts round-trip; as_module sees the same heads either way."""
    pool = HeadPool(((5, 16), (3, 8)), heads_per_level=3, hidden=8, num_groups=4)
    sd = pool.state_dict()
    old = copy.copy(sd)
    for key in sd:
        if ".conv_weight." in key:
            old[key] = sd[key].permute(0, 4, 3, 1, 2).contiguous()
    old._metadata = copy.deepcopy(sd._metadata)
    for prefix in old._metadata:
        if prefix.startswith("pools.") and prefix.count(".") == 1:
            assert old._metadata[prefix]["version"] == 2
            old._metadata[prefix]["version"] = 1
    for state in (old, sd):
        fresh = HeadPool(((5, 16), (3, 8)), heads_per_level=3, hidden=8, num_groups=4)
        fresh.load_state_dict(state)
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, sd[key]), key
    x = torch.randn(2, 5, 16, 16)
    torch.testing.assert_close(fresh.as_module(1)(x), pool.as_module(1)(x))


def test_load_from_modules_checks_everything_before_writing():
    pool = HeadPool(((3, 16), (5, 8)), heads_per_level=2, hidden=4, num_groups=2)
    state = {n: p.detach().clone() for n, p in pool.named_parameters()}
    good = pool.as_module(3)
    with torch.no_grad():
        for p in good.parameters():
            p.add_(1)
    wrong_level = pool.as_module(0)  # level 0 heads have two conv layers and 3 input channels
    with pytest.raises(ValueError, match=r"head 2 \(level 1\)"):
        pool.load_from_modules({3: good, 2: wrong_level})
    for n, p in pool.named_parameters():
        assert torch.equal(p.detach(), state[n]), "a failed load must not write anything"
    bad_groups = pool.as_module(2)
    bad_groups[1] = torch.nn.GroupNorm(4, 4)
    with pytest.raises(ValueError, match="GroupNorm"):
        pool.load_from_modules({2: bad_groups})
    bad_stride = pool.as_module(2)
    bad_stride[0].stride = (1, 1)
    with pytest.raises(ValueError, match="stride=2"):
        pool.load_from_modules({2: bad_stride})
    with pytest.raises(IndexError, match="out of range"):
        pool.load_from_modules({4: good})
    with pytest.raises(TypeError, match="mapping"):
        pool.load_from_modules([good])


def test_initialisation_like_torch_defaults():
    pool = HeadPool(((6, 16),), heads_per_level=5, hidden=8, num_groups=4)
    heads = pool.pools[0]
    for w, b in zip(heads.conv_weight, heads.conv_bias):
        assert w.shape[:3] == (5, 4, 4) and w.shape[4] == 8 and w.is_contiguous()   # GEMM layout [P, 4, 4, I, O]
        bound = 1 / math.sqrt(w.shape[3] * 16)
        assert w.abs().max() <= bound and b.abs().max() <= bound
        assert w.abs().max() > 0.8 * bound  # uniform over the whole range
        assert not torch.equal(w[0], w[1])  # every head drawn independently
    assert (torch.stack(list(heads.norm_weight)) == 1).all() and (torch.stack(list(heads.norm_bias)) == 0).all()
    assert heads.final_weight.abs().max() <= 1 / math.sqrt(8 * 16)
    sdxl = HeadPool(heads_per_level=1, hidden=32, device="meta")
    assert sdxl.depths == (5, 5, 5, 4, 4, 4, 3, 3, 3, 3) and sdxl.num_heads == 10 and sdxl.levels == SDXL_LEVELS
    local = HeadPool(heads_per_level=1, hidden=32, kind="local", device="meta")
    assert local.depths == (4, 4, 4, 3, 3, 3, 2, 2, 2, 2)


# -------------------------------------------------------------------------------------- sampling
def test_sample_layout_and_determinism():
    pool = HeadPool(((3, 8), (3, 8), (5, 16)), heads_per_level=4, hidden=4, num_groups=2)
    ids = pool.sample(3, generator=torch.Generator().manual_seed(1))
    assert isinstance(ids, HeadSample) and ids.dtype == torch.long and ids.shape == (9,) and ids.counts == (3, 3, 3)
    for level in range(3):
        part = ids[3 * level:3 * level + 3]
        assert type(part) is torch.Tensor  # operations drop the layout tag
        assert part.unique().numel() == 3 and ((part // 4) == level).all()
    again = pool.sample(3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ids, again)
    assert pool.sample((4, 0, 1)).counts == (4, 0, 1)
    with pytest.raises(ValueError, match=r"\[0, heads_per_level=4\]"):
        pool.sample(5)
    with pytest.raises(ValueError, match="one int per level"):
        pool.sample((1, 2))
    clone = copy.deepcopy(ids)
    assert isinstance(clone, HeadSample) and clone.counts == ids.counts and torch.equal(clone, ids)
    assert pickle.loads(pickle.dumps(ids)).counts == (3, 3, 3)


def test_as_sample_validates_once():
    pool = HeadPool(((3, 8), (5, 16)), heads_per_level=2, hidden=4, num_groups=2)
    s = pool.as_sample(torch.tensor([1, 3, 2]), (1, 2))
    assert isinstance(s, HeadSample) and s.counts == (1, 2)
    with pytest.raises(ValueError, match="should be heads of level 0"):
        pool.as_sample(torch.tensor([3, 1, 2]), (1, 2))
    with pytest.raises(ValueError, match="sums to 3"):
        pool.as_sample(torch.tensor([1, 3]), (1, 2))
    other = HeadPool(((3, 8), (5, 16)), heads_per_level=3, hidden=4, num_groups=2).sample(1)
    with pytest.raises(ValueError, match="not made for this pool"):
        pool(make_features(pool, 1), other)
    with pytest.raises(IndexError, match="level 1"):  # a hand-made HeadSample with wrong ids (checked on CPU)
        pool(make_features(pool, 1), HeadSample(torch.tensor([0, 0]), (1, 1), 2))


# ------------------------------------------------------------------------------------- bad input
@pytest.fixture
def no_kernel(monkeypatch):
    monkeypatch.setattr(head_pool_module, "_head_levels",
                        lambda *a, **k: pytest.fail("a kernel ran before the input was rejected"))


def test_bad_features_rejected_before_any_kernel(no_kernel):
    pool = HeadPool(((3, 8), (5, 16)), heads_per_level=2, hidden=4, num_groups=2)
    ids = torch.tensor([0, 3])
    good = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 16, 16)]
    cases = [
        (good[:1], ValueError, "got 1 feature maps for 2 levels"),
        (good[0], TypeError, "list of 2 tensors"),
        ([good[0], torch.randn(2, 4, 16, 16)], ValueError, r"features\[1\] has shape \(2, 4, 16, 16\); level 1 "
                                                           r"expects \[B, 5, 16, 16\]"),
        ([good[0], torch.randn(2, 5, 16, 8)], ValueError, r"features\[1\] has shape"),
        ([good[0], torch.randn(2, 5, 16)], ValueError, r"features\[1\] has shape"),
        ([good[0], torch.randn(3, 5, 16, 16)], ValueError, "batch 3"),
        ([good[0], torch.randn(2, 5, 16, 16, dtype=torch.float64)], TypeError, "dtype torch.float64"),
        ([good[0], torch.ones(2, 5, 16, 16, dtype=torch.long)], TypeError, "floating"),
        ([good[0], None], TypeError, "not a tensor"),
        ([torch.randn(0, 3, 8, 8), torch.randn(0, 5, 16, 16)], ValueError, "empty"),
        ([good[0], torch.randn(2, 5, 16, 16, device="meta")], ValueError, "is on meta"),
    ]
    for features, error, match in cases:
        with pytest.raises(error, match=match):
            pool(features, ids)


def test_bad_ids_rejected_before_any_kernel(no_kernel):
    pool = HeadPool(((3, 8), (5, 16)), heads_per_level=2, hidden=4, num_groups=2)
    features = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 16, 16)]
    cases = [
        (torch.tensor([0, 4]), IndexError, r"head ids \[4\] are out of range \[0, 4\)"),
        (torch.tensor([-1, 2]), IndexError, r"\[-1\]"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer"),
        (torch.tensor([[0, 1]]), ValueError, "1-D"),
        ([0, 1], TypeError, "LongTensor"),
        (torch.tensor([0, 1], device="meta"), ValueError, "head_ids are on meta"),
    ]
    for ids, error, match in cases:
        with pytest.raises(error, match=match):
            pool(features, ids)
    meta_pool = HeadPool(((3, 8),), heads_per_level=2, hidden=4, num_groups=2, device="meta")
    with pytest.raises(ValueError, match="pool's parameters are on meta"):
        meta_pool([torch.randn(1, 3, 8, 8)], torch.tensor([0]))


def test_constructor_validation():
    with pytest.raises(ValueError, match="does not halve down to 4"):
        HeadPool(((3, 24),), hidden=4, num_groups=2)
    with pytest.raises(ValueError, match="size 4"):
        HeadPool(((3, 4),), hidden=4, num_groups=2)
    with pytest.raises(ValueError, match="local_size=8"):
        HeadPool(((3, 8),), hidden=4, num_groups=2, kind="local")
    with pytest.raises(ValueError, match="divisible by num_groups"):
        HeadPool(((3, 8),), hidden=6, num_groups=4)
    with pytest.raises(ValueError, match="kind"):
        HeadPool(((3, 8),), hidden=4, num_groups=2, kind="patch")
    with pytest.raises(ValueError, match="heads_per_level"):
        HeadPool(((3, 8),), heads_per_level=0, hidden=4, num_groups=2)
    with pytest.raises(ValueError, match="levels is empty"):
        HeadPool((), hidden=4, num_groups=2)
    with pytest.raises(ValueError, match="pairs"):
        HeadPool((3, 8), hidden=4, num_groups=2)


# ---------------------------------------------------------------------------------------- refresh
def _snapshot(pool):
    return {n: p.detach().clone() for n, p in pool.named_parameters()}


def _changed_heads(pool, before):
    heads = set()
    for name, p in pool.named_parameters():
        level = int(name.split(".")[1])
        for row in range(pool.heads_per_level):
            if not torch.equal(p.detach()[row], before[name][row]):
                heads.add(level * pool.heads_per_level + row)
    return heads


def test_refresh_with_sampled_adamw_resets_exactly_those_heads():
    pool = HeadPool(((3, 8), (5, 16)), heads_per_level=4, hidden=4, num_groups=2)
    opt = SampledAdamW(pool.parameters(), lr=1e-2)
    with use_backend("eager", "head_stack"):
        pool(make_features(pool, 2), torch.arange(8)).sum().backward()
    opt.step()
    before = _snapshot(pool)
    state_before = {n: copy.deepcopy(opt.state[p]) for n, p in pool.named_parameters()}
    ids = pool.refresh_(0.25, generator=torch.Generator().manual_seed(3), optimizer=opt)
    assert ids.dtype == torch.long and ids.numel() == 2 and torch.equal(ids, ids.sort().values)
    assert _changed_heads(pool, before) == set(ids.tolist())
    for name, p in pool.named_parameters():
        level = int(name.split(".")[1])
        rows = [h - 4 * level for h in ids.tolist() if h // 4 == level]
        keep = [r for r in range(4) if r not in rows]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert (opt.state[p][key][rows] == 0).all()
            assert torch.equal(opt.state[p][key][keep], state_before[name][key][keep])
    for h in ids.tolist():  # refreshed heads look freshly initialised
        m = pool.as_module(h)
        assert (m[1].weight == 1).all() and (m[1].bias == 0).all()
    same = HeadPool(((3, 8), (5, 16)), heads_per_level=4, hidden=4, num_groups=2)
    assert torch.equal(same.refresh_(0.25, generator=torch.Generator().manual_seed(3)), ids)


def test_refresh_with_torch_adamw_zeroes_moment_rows():
    pool = HeadPool(((3, 8),), heads_per_level=4, hidden=4, num_groups=2)
    opt = torch.optim.AdamW(pool.parameters(), lr=1e-2)
    for p in pool.parameters():
        p.grad = torch.randn_like(p)  # dense gradients: torch AdamW rejects sparse ones
    opt.step()
    ids = pool.refresh_(0.5, generator=torch.Generator().manual_seed(0), optimizer=opt)
    assert ids.numel() == 2
    rows = ids.tolist()
    for p in pool.parameters():
        state = opt.state[p]
        assert (state["exp_avg"][rows] == 0).all() and (state["exp_avg_sq"][rows] == 0).all()
        keep = [r for r in range(4) if r not in rows]
        assert (state["exp_avg"][keep] != 0).any()
        assert float(state["step"]) == 1.0  # one counter per tensor: documented, not reset


def test_refresh_fraction_validation_and_counts():
    pool = HeadPool(((3, 8), (5, 16)), heads_per_level=4, hidden=4, num_groups=2)
    for bad in (-0.1, 1.5, True, "0.1", None, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            pool.refresh_(bad)
    before = _snapshot(pool)
    assert pool.refresh_(0.0).numel() == 0 and _changed_heads(pool, before) == set()
    assert pool.refresh_(1.0).tolist() == list(range(8))
    assert _changed_heads(pool, before) == set(range(8))
    # stochastic rounding: 0.01 of 8 heads refreshes 0 or 1 head, about 8% of the time
    gen = torch.Generator().manual_seed(0)
    counts = [pool.refresh_(0.01, generator=gen).numel() for _ in range(400)]
    assert set(counts) <= {0, 1} and 10 <= sum(counts) <= 60
    other = HeadPool(((3, 8),), heads_per_level=2, hidden=4, num_groups=2)
    with pytest.raises(ValueError, match="does not hold any"):
        pool.refresh_(0.5, optimizer=SampledAdamW(other.parameters()))


def test_reset_heads_validation():
    pool = HeadPool(((3, 8),), heads_per_level=2, hidden=4, num_groups=2)
    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        pool.reset_heads_([2])
    before = _snapshot(pool)
    pool.reset_heads_(torch.tensor([1, 1]))
    assert _changed_heads(pool, before) == {1}


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty / empty_like return NaN-filled float tensors while a test runs: any element a kernel fails
    to write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sdxl_shapes_on_gpu(poisoned, dtype):
    """SDXL feature shapes (batch 2 to keep it short), mixed levels: fused vs the fp64 loop -- logits and feature
    gradients (bf16: within 2x the error of the eager bf16 loop), fp32 also every parameter gradient."""
    pool = HeadPool(heads_per_level=2, hidden=64, num_groups=32).cuda()
    features = [random_tensor((2, c, s, s), dtype=dtype, device="cuda", requires_grad=True) for c, s in pool.levels]
    ids = torch.tensor([19, 0, 7, 12, 0], device="cuda")
    if dtype == torch.float32:
        check_against_loop(pool, features, ids, "sdxl fp32")
        return
    out = pool(features, ids)
    grad_out = torch.randn_like(out)
    ref_out, ref_grads, _ = loop_reference(pool, features, ids, grad_out)
    feats_eager = [f.detach().clone().requires_grad_(True) for f in features]
    eager = torch.stack([pool.as_module(h).to(dtype)(feats_eager[h // 2])[:, 0, 0, 0] for h in ids.tolist()])
    eager.backward(grad_out)
    assert_close_to_reference(out, ref_out, eager, name="sdxl logits")
    out.backward(grad_out)
    for level in sorted({h // 2 for h in ids.tolist()}):
        ref = ref_grads[level]
        assert_close_to_reference(features[level].grad, ref, feats_eager[level].grad,
                                  atol=torch.finfo(dtype).eps * ref.abs().max().item(), name=f"grad features[{level}]")
    assert F.softplus(out.float()).isfinite().all()


@pytest.mark.gpu
def test_all_levels_step_captured_in_a_cuda_graph():
    """The 10-level SDXL pool with a HeadSample: forward + backward in one op call per direction runs without
    host syncs and replays from a CUDA graph with the eager results."""
    pool = HeadPool(heads_per_level=2, hidden=64, num_groups=32, device="cuda", dtype=torch.bfloat16)
    features = [random_tensor((2, c, s, s), dtype=torch.bfloat16, device="cuda", requires_grad=True)
                for c, s in pool.levels]
    ids = pool.sample(1, generator=torch.Generator(device="cuda").manual_seed(0))
    params = list(pool.parameters())
    grad_out = torch.randn(pool.output_shape(len(ids), 2), device="cuda", dtype=torch.bfloat16)

    def step():
        out = pool(features, ids)
        return (out, *torch.autograd.grad(out, features + params, grad_out, allow_unused=True))

    assert_graph_capturable(step)
