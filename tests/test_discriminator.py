"""DynamicDiscriminator on tiny SDXL-like (text embeddings + added time ids) and digits UNets.

* the backbone features are exactly the UNet's own conv_in / down-block residual / mid outputs;
* both losses (both loss forms) equal a plain loop over the sampled heads (HeadPool.as_module) on re-noised
  inputs; the diagnostics (accuracy, logit gap, head age) are what their names say;
* gradients reach the fake input only (never the backbone, the real input, or the heads in g_loss);
* one iteration with the fused head backend (Triton; its CPU interpreter without a GPU) matches the eager one;
* refresh re-initialises heads and resets their optimiser rows, only among heads with enough recorded updates,
  and resets their ages; bad configuration fails at construction.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from nitrokernels.nitro.discriminator import KINDS, DynamicDiscriminator, backbone_levels
from nitrokernels.optim import SampledAdamW

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEADS = dict(hidden=16, num_groups=4, local_size=4)


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8, transformer_layers_per_block=1,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=24 + 6 * 4,
    ).to(DEVICE)


def tiny_digits_unet():
    from nitrokernels.digits import data as digits

    return digits.make_digits_unet(block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
                                   attention_head_dim=4).to(DEVICE)


def sdxl_cond(batch, empty=False):
    scale = 0.0 if empty else 1.0
    return {"encoder_hidden_states": torch.randn(batch, 5, 24, device=DEVICE) * scale,
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, 24, device=DEVICE) * scale,
                                  "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]], device=DEVICE).repeat(batch, 1)}}


def digits_cond(batch, empty=False):
    return {"encoder_hidden_states": torch.randn(batch, 1, 16, device=DEVICE) * (0.0 if empty else 1.0)}


CONFIGS = {"sdxl": (tiny_sdxl_unet, sdxl_cond, 4), "digits": (tiny_digits_unet, digits_cond, 1)}


def make(name, **kwargs):
    make_unet, make_cond, channels = CONFIGS[name]
    unet = make_unet()
    # one t* group per iteration keeps these tests fast; the default (every group) is tested on its own
    disc = DynamicDiscriminator(unet, **{**HEADS, "pool_sizes": 2, "t_star_sampled": 1, **kwargs})
    return disc, make_cond, channels


def latents(batch, channels, requires_grad=False):
    return torch.randn(batch, channels, 16, 16, device=DEVICE, requires_grad=requires_grad)


# --------------------------------------------------------------------------------------------- backbone
@pytest.mark.parametrize("name", ["sdxl", "digits"])
def test_features_are_the_unets_own_encoder_outputs(name):
    disc, make_cond, channels = make(name)
    unet = disc.backbone
    x, cond = latents(2, channels), make_cond(2)
    captured = []

    def hook(module, inputs, output):
        captured.append(output)

    handles = [unet.conv_in.register_forward_hook(hook)] + [b.register_forward_hook(hook) for b in unet.down_blocks] \
        + [unet.mid_block.register_forward_hook(hook)]
    with torch.no_grad():
        unet(x, 250, **cond)
        for h in handles:
            h.remove()
        feats = disc.features(x, 250, **cond)
    expected = [captured[0]] + [r for out in captured[1:-1] for r in out[1]] + [captured[-1]]
    assert len(feats) == len(expected) == len(disc.levels) == 5
    for f, e, (c, s) in zip(feats, expected, disc.levels):
        assert f.shape == (2, c, s, s)
        torch.testing.assert_close(f, e, rtol=0, atol=0)


def test_levels_are_derived_and_validated():
    unet = tiny_digits_unet()
    assert backbone_levels(unet) == ((16, 16), (16, 16), (16, 8), (32, 8), (32, 8))
    assert backbone_levels(unet, 32)[0] == (16, 32)
    DynamicDiscriminator(unet, levels=[(16, 16), (16, 16), (16, 8), (32, 8), (32, 8)], **HEADS)
    with pytest.raises(ValueError, match="do not match the backbone"):
        DynamicDiscriminator(unet, levels=[(16, 16), (16, 16), (16, 8), (32, 8)], **HEADS)
    with pytest.raises(ValueError, match="do not match the backbone"):
        DynamicDiscriminator(unet, levels=[(16, 16), (16, 16), (16, 8), (32, 8), (64, 8)], **HEADS)


@pytest.mark.parametrize("kwargs, match", [
    (dict(pool_sizes=0), "every pool is empty"),
    (dict(pool_sizes={"global_conditional": 0, "local_conditional": 0, "local_unconditional": 0}), "every pool is empty"),
    (dict(pool_sizes={"global": 2}), "unknown kinds"),
    (dict(pool_sizes=-1), "pool_sizes"),
    (dict(refresh_rate=1.5), r"refresh_rate must be in \[0, 1\]"),
    (dict(refresh_rate=-0.01), r"refresh_rate must be in \[0, 1\]"),
    (dict(heads_sampled=3, pool_sizes=2), "exceeds its pool"),
    (dict(heads_sampled=0), "heads_sampled"),
    (dict(t_star=()), "t_star is empty"),
    (dict(t_star=(10, 1000)), "outside"),
    (dict(t_star=(10, 10)), "repeated"),
    (dict(t_star_sampled=5), "t_star_sampled"),
    (dict(refresh_min_updates=-1), "refresh_min_updates"),
    (dict(refresh_min_updates=2.5), "refresh_min_updates"),
    (dict(loss="wasserstein"), "loss must be one of"),
    (dict(head_reduction="max"), "head_reduction"),
    (dict(head_backend="cuda"), "head_backend"),
    (dict(local_size=16), "local_size"),
    (dict(hidden=10, num_groups=4), "divisible"),
])
def test_bad_configuration_fails_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicDiscriminator(tiny_digits_unet(), **{**HEADS, **kwargs})


def test_not_a_unet_is_refused():
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        DynamicDiscriminator(torch.nn.Linear(2, 2))


def test_call_time_errors():
    disc, make_cond, channels = make("digits")
    real, fake = latents(3, channels), latents(3, channels)
    with pytest.raises(ValueError, match="prompts and latents must match"):
        disc.d_loss(real, fake, make_cond(2), make_cond(3, True))
    with pytest.raises(ValueError, match="prompts and latents must match"):
        disc.g_loss(fake, make_cond(3), make_cond(4, True))
    with pytest.raises(ValueError, match="need `uncond`"):
        disc.g_loss(fake, make_cond(3))
    with pytest.raises(ValueError, match="built for 16x16"):
        disc.g_loss(torch.randn(3, channels, 8, 8, device=DEVICE), make_cond(3), make_cond(3, True))
    with pytest.raises(ValueError, match="differ"):
        disc.d_loss(real, latents(2, channels), make_cond(3), make_cond(3, True))
    # without unconditional heads, uncond is optional
    disc2, _, _ = make("digits", pool_sizes={"global_conditional": 2, "local_conditional": 1})
    assert disc2.kinds == ("global_conditional", "local_conditional")
    fake.requires_grad_(True)
    with disc2.backend_context():
        disc2.g_loss(fake, make_cond(3)).g_loss.backward()
    assert fake.grad is not None


# ------------------------------------------------------------------------------------------- semantics
def test_pool_layout_and_sampling():
    disc, _, _ = make("digits", pool_sizes={"global_conditional": 3, "local_conditional": 2, "local_unconditional": 1})
    assert len(disc.pools) == 4 * 3
    assert disc.num_heads == 4 * 5 * (3 + 2 + 1)
    assert disc.heads_per_iteration == 1 * 5 * 3
    gen = torch.Generator().manual_seed(0)
    sel = disc.sample(generator=gen)
    assert len(sel.t_indices) == 1 and set(sel.ids) == {(sel.t_indices[0], k) for k in KINDS}
    seen = {disc.sample(generator=gen).t_indices[0] for _ in range(40)}
    assert seen == {0, 1, 2, 3}
    disc_all, _, _ = make("digits", t_star_sampled=None)
    assert disc_all.sample(generator=gen).t_indices == (0, 1, 2, 3)
    assert disc_all.heads_per_iteration == 4 * 5 * 3
    default = DynamicDiscriminator(tiny_digits_unet(), **HEADS)  # the paper's "a subset per t*": every group
    assert default.t_star_sampled == 4 and default.sample(generator=gen).t_indices == (0, 1, 2, 3)


def _loop_losses(disc, real, fake, cond, uncond, sel, gen_state, loss):
    """Losses recomputed with a plain loop over HeadPool.as_module heads (float64) and the same noise."""
    gen = torch.Generator(device=real.device)
    gen.set_state(gen_state)
    d_total, g_total = 0.0, 0.0
    for ti in sel.t_indices:
        t = disc.t_star[ti]
        a = disc.alphas_cumprod[t].double()

        def noised(x):
            eps = torch.randn(x.shape, generator=gen, device=x.device)
            return a.sqrt() * x.double() + (1 - a).sqrt() * eps.double()

        rn, fn = noised(real), noised(fake)
        feats = {}
        with torch.no_grad():
            for tag, c in (("cond", cond), ("uncond", uncond)):
                feats[tag] = [f.double() for f in disc.features(torch.cat([rn, fn]).float(), t,
                                                                **{k: _cat(v) for k, v in c.items()})]
        for kind in disc.kinds:
            pool = disc.pools[disc._key(ti, kind)]
            fs = feats["uncond" if kind.endswith("unconditional") else "cond"]
            for head in sel.ids[(ti, kind)].tolist():
                level = head // pool.heads_per_level
                y = pool.as_module(head).double()(fs[level])[:, 0]
                y = y.reshape(y.shape[0], -1)
                r, f = y[: real.shape[0]], y[real.shape[0]:]
                if loss == "nonsaturating":
                    d_total += F.softplus(-r).mean() + F.softplus(f).mean()
                else:
                    d_total += F.relu(1 - r).mean() + F.relu(1 + f).mean()
    return d_total, g_total


def _loop_g_loss(disc, fake, cond, uncond, sel, gen_state, loss):
    """g_loss recomputed with a plain loop (float64), the noise drawn as g_loss draws it (fake only)."""
    gen = torch.Generator(device=fake.device)
    gen.set_state(gen_state)
    total = 0.0
    for ti in sel.t_indices:
        t = disc.t_star[ti]
        a = disc.alphas_cumprod[t].double()
        eps = torch.randn(fake.shape, generator=gen, device=fake.device)
        noised = (a.sqrt() * fake.double() + (1 - a).sqrt() * eps.double()).float()
        with torch.no_grad():
            feats = {tag: [f.double() for f in disc.features(noised, t, **c)] for tag, c in (("cond", cond),
                                                                                           ("uncond", uncond))}
        for kind in disc.kinds:
            pool = disc.pools[disc._key(ti, kind)]
            fs = feats["uncond" if kind.endswith("unconditional") else "cond"]
            for head in sel.ids[(ti, kind)].tolist():
                y = pool.as_module(head).double()(fs[head // pool.heads_per_level])[:, 0].reshape(fake.shape[0], -1)
                # the generator wants its fakes scored as real: non-saturating -log sigmoid(D), hinge -D
                total += F.softplus(-y).mean() if loss == "nonsaturating" else (-y).mean()
    return total


def _cat(v):
    if isinstance(v, dict):
        return {k: _cat(x) for k, x in v.items()}
    return torch.cat([v, v])


@pytest.mark.parametrize("loss", ["nonsaturating", "hinge"])
@pytest.mark.parametrize("name", ["sdxl", "digits"])
def test_d_loss_equals_a_loop_over_the_sampled_heads(name, loss):
    disc, make_cond, channels = make(name, loss=loss, head_backend="eager", batch_backbone=False)
    real, fake = latents(2, channels), latents(2, channels)
    cond, uncond = make_cond(2), make_cond(2, True)
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    sel = disc.sample(generator=gen, host_generator=torch.Generator().manual_seed(1))
    state = gen.get_state()
    out = disc.d_loss(real, fake, cond, uncond, selection=sel, generator=gen)
    expected, _ = _loop_losses(disc, real, fake, cond, uncond, sel, state, loss)
    torch.testing.assert_close(out.d_loss.double(), expected, rtol=1e-4, atol=1e-4)
    stats = out.as_floats()
    for kind in KINDS:
        assert stats[f"{kind}/heads"] == 5.0
        assert 0.0 <= stats[f"{kind}/d_accuracy"] <= 1.0


@pytest.mark.parametrize("loss", ["nonsaturating", "hinge"])
@pytest.mark.parametrize("name", ["sdxl", "digits"])
def test_g_loss_equals_a_loop_over_the_sampled_heads(name, loss):
    disc, make_cond, channels = make(name, loss=loss, head_backend="eager", batch_backbone=False)
    fake = latents(2, channels)
    cond, uncond = make_cond(2), make_cond(2, True)
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    sel = disc.sample(generator=gen, host_generator=torch.Generator().manual_seed(2))
    state = gen.get_state()
    out = disc.g_loss(fake, cond, uncond, selection=sel, generator=gen)
    torch.testing.assert_close(out.g_loss.double(), _loop_g_loss(disc, fake, cond, uncond, sel, state, loss),
                               rtol=1e-4, atol=1e-4)


def test_generator_and_discriminator_losses_pull_the_logits_apart():
    """The signs of the game, independent of any head: making the fake score higher (more "real") lowers the
    generator loss and raises the discriminator loss, in both loss forms."""
    for loss in ("nonsaturating", "hinge"):
        disc, _, _ = make("digits", loss=loss)
        real = torch.full((3, 2), 0.3)
        fake = torch.full((3, 2), -0.2, requires_grad=True)
        g = disc._reduce(disc._g_term(fake))
        (grad_g,) = torch.autograd.grad(g, fake)
        lr, lf = disc._d_terms(real, fake)
        (grad_d,) = torch.autograd.grad(disc._reduce(lr) + disc._reduce(lf), fake)
        assert (grad_g < 0).all() and (grad_d > 0).all(), loss


def test_diagnostics_mean_what_they_say():
    disc, make_cond, channels = make("digits", head_backend="eager")
    real, fake = latents(2, channels), latents(2, channels)
    cond, uncond = make_cond(2), make_cond(2, True)
    sel = disc.sample(generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        disc.record_updates(sel)
    out = disc.d_loss(real, fake, cond, uncond, selection=sel, generator=torch.Generator().manual_seed(1)).as_floats()
    for kind in disc.kinds:
        assert out[f"{kind}/logit_gap"] == pytest.approx(out[f"{kind}/real_logit"] - out[f"{kind}/fake_logit"], abs=1e-6)
        assert out[f"{kind}/head_age"] == 3.0


def test_accuracy_per_t_star_is_each_groups_own():
    """d_accuracy_t<t*> is the accuracy of that t* group's heads (mean over kinds), recomputed here from the
    heads' logits on the discriminator's own re-noised inputs; the kinds' d_accuracy is their mean over groups."""
    disc, make_cond, channels = make("digits", head_backend="eager", t_star_sampled=2)
    real, fake = latents(3, channels), latents(3, channels)
    cond, uncond = make_cond(3), make_cond(3, True)
    sel = disc.sample(generator=torch.Generator().manual_seed(0))
    out = disc.d_loss(real, fake, cond, uncond, selection=sel, generator=torch.Generator().manual_seed(1))
    flat = out.as_floats()
    gen = torch.Generator().manual_seed(1)
    expected = {}
    for ti in sel.t_indices:
        t = disc.t_star[ti]
        both = torch.cat([disc.renoise(real, t, gen), disc.renoise(fake, t, gen)])
        accs = []
        with torch.no_grad():
            for kind in disc.kinds:
                c = uncond if kind.endswith("unconditional") else cond
                feats = disc.features(both, t, **{k: torch.cat([v, v]) for k, v in c.items()})
                logits = disc._heads(ti, kind, feats, sel)
                accs.append(0.5 * ((logits[:, :3] > 0).float().mean() + (logits[:, 3:] < 0).float().mean()))
        expected[t] = torch.stack(accs).mean().item()
    assert len(expected) == 2
    for t, acc in expected.items():
        assert flat[f"d_accuracy_t{t}"] == pytest.approx(acc, abs=1e-6)
    # the kinds' accuracies average the same numbers the other way round
    assert sum(flat[f"d_accuracy_t{t}"] for t in expected) / 2 == pytest.approx(
        sum(flat[f"{k}/d_accuracy"] for k in disc.kinds) / len(disc.kinds), abs=1e-6)


def test_batched_and_unbatched_backbone_agree():
    disc, make_cond, channels = make("sdxl", head_backend="eager")
    real, fake = latents(2, channels), latents(2, channels, requires_grad=True)
    cond, uncond = make_cond(2), make_cond(2, True)
    sel = disc.sample(generator=torch.Generator().manual_seed(0))
    outs = []
    for batched in (True, False):
        disc.batch_backbone = batched
        fake.grad = None
        gen = torch.Generator(device=DEVICE).manual_seed(5)
        out = disc(real, fake, cond, uncond, selection=sel, generator=gen)
        with disc.backend_context():
            out.g_loss.backward()
        outs.append((out.d_loss.detach(), out.g_loss.detach(), fake.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["sdxl", "digits"])
def test_gradients_reach_the_fake_input_only(name):
    disc, make_cond, channels = make(name, head_backend="eager")
    real, fake = latents(2, channels, requires_grad=True), latents(2, channels, requires_grad=True)
    cond, uncond = make_cond(2), make_cond(2, True)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    sel = disc.sample(generator=gen)
    g = disc.g_loss(fake, cond, uncond, selection=sel, generator=gen)
    with disc.backend_context():
        g.g_loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert all(not p.requires_grad for p in disc.backbone.parameters())
    assert all(p.grad is None for p in disc.head_parameters()), "g_loss must not train the heads"
    assert all(p.requires_grad for p in disc.head_parameters()), "heads must be trainable again after g_loss"
    d = disc.d_loss(real, fake, cond, uncond, selection=sel, generator=gen)
    fake.grad = None
    with disc.backend_context():
        d.d_loss.backward()
    assert real.grad is None and fake.grad is None
    with_grad = [p for p in disc.head_parameters() if p.grad is not None]
    assert with_grad and all(p.grad.is_sparse for p in with_grad)
    sampled_pools = {disc._key(ti, k) for ti, k in sel.ids}
    for key, pool in disc.pools.items():
        has = any(p.grad is not None for p in pool.parameters())
        assert has == (key in sampled_pools)


@pytest.mark.parametrize("name", ["sdxl", "digits"])
def test_fused_and_eager_heads_give_the_same_iteration(name):
    """One d_loss + g_loss iteration with the Triton head kernels (interpreter on CPU) vs the eager reference."""
    disc, make_cond, channels = make(name, pool_sizes=1)
    real, fake0 = latents(2, channels), latents(2, channels)
    cond, uncond = make_cond(2), make_cond(2, True)
    sel = disc.sample(generator=torch.Generator().manual_seed(2))
    results = {}
    for backend in ("triton", "eager"):
        disc.head_backend = backend
        disc.pools.zero_grad(set_to_none=True)
        fake = fake0.clone().requires_grad_(True)
        gen = torch.Generator(device=DEVICE).manual_seed(7)
        out = disc(real, fake, cond, uncond, selection=sel, generator=gen)
        with disc.backend_context():  # backward picks its backend when it runs
            out.d_loss.backward()
            grads = {n: p.grad.to_dense().clone() for n, p in disc.pools.named_parameters() if p.grad is not None}
            out.g_loss.backward()
        results[backend] = (out.d_loss.detach(), out.g_loss.detach(), fake.grad.clone(), grads)
    (dt, gt, ft, ht), (de, ge, fe, he) = results["triton"], results["eager"]
    torch.testing.assert_close(dt, de, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gt, ge, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ft, fe, rtol=1e-3, atol=1e-6)
    assert ht.keys() == he.keys() and ht
    for key in ht:
        torch.testing.assert_close(ht[key], he[key], rtol=1e-3, atol=1e-5, msg=key)


def test_refresh_reinitialises_heads_and_their_optimiser_rows():
    disc, make_cond, channels = make("digits", pool_sizes=4, head_backend="eager", refresh_rate=1.0,
                                     refresh_min_updates=0)
    opt = SampledAdamW(disc.head_parameters(), lr=1e-2)
    sel = disc.sample(generator=torch.Generator().manual_seed(0))
    out = disc.d_loss(latents(2, channels), latents(2, channels), make_cond(2), make_cond(2, True), selection=sel)
    with disc.backend_context():
        out.d_loss.backward()
    opt.step()
    before = copy.deepcopy(disc.heads_state_dict())
    assert any(float(s["step"].sum()) > 0 for s in opt.state.values())
    count = disc.refresh(optimizer=opt, generator=torch.Generator().manual_seed(1))
    assert count == disc.num_heads  # rate 1: every head
    assert all(float(s["step"].sum()) == 0 and float(s["exp_avg"].abs().sum()) == 0 for s in opt.state.values())
    after = disc.heads_state_dict()
    changed = [k for k in before if "conv_weight" in k and not torch.equal(before[k], after[k])]
    assert changed
    # the default 1%: stochastic rounding of 0.01 * pool per pool; on average 1% of all heads
    disc.refresh_rate = 0.01
    counts = [disc.refresh(generator=torch.Generator().manual_seed(s)) for s in range(50)]
    assert 0 < sum(counts) / 50 < 0.03 * disc.num_heads
    assert disc.refresh(rate=0.0) == 0
    with pytest.raises(ValueError):
        disc.refresh(rate=2.0)


def test_refresh_takes_only_heads_with_enough_updates_and_resets_their_ages():
    disc, make_cond, channels = make("digits", pool_sizes=4, head_backend="eager", refresh_min_updates=2,
                                     refresh_rate=1.0)
    assert disc.refresh(generator=torch.Generator().manual_seed(0)) == 0, "no head has been updated yet"
    sel = disc.sample(generator=torch.Generator().manual_seed(3))
    old = disc.sample(generator=torch.Generator().manual_seed(4))
    disc.record_updates(sel)
    disc.record_updates(sel)
    disc.record_updates(old)
    ages = {k: v.clone() for k, v in disc.head_ages().items()}
    expected_old = {(k, i) for k, v in ages.items() for i in (v >= 2).nonzero().flatten().tolist()}
    assert len(expected_old) == sum(v.numel() for v in sel.ids.values())
    before = copy.deepcopy(disc.heads_state_dict())
    assert disc.refresh(generator=torch.Generator().manual_seed(1)) == len(expected_old)
    after = disc.heads_state_dict()
    for key, pool in disc.pools.items():
        reset = (disc.head_ages()[key] == 0) & (ages[key] >= 2)
        kept = ages[key] < 2
        assert torch.equal(disc.head_ages()[key][kept], ages[key][kept]), "young heads keep their age"
        assert int(reset.sum()) == int((ages[key] >= 2).sum()), "refreshed heads start again at age 0"
        for head in range(pool.num_heads):
            level, row = divmod(head, pool.heads_per_level)
            matches = [n for n in before if n.startswith(f"{key}.pools.{level}.") and "weight" in n]
            changed = any(not torch.equal(before[n][row], after[n][row]) for n in matches)
            assert changed == bool(ages[key][head] >= 2), (key, head)
    # ages travel with the heads' state; an older state without them loads with age 0
    state = copy.deepcopy(disc.heads_state_dict())
    other, _, _ = make("digits", pool_sizes=4, head_backend="eager")
    other.load_heads_state_dict(state)
    assert all(torch.equal(other.head_ages()[k], v) for k, v in disc.head_ages().items())
    other.load_heads_state_dict({k: v for k, v in state.items() if not k.startswith("ages.")})
    assert all(int(v.sum()) == 0 for v in other.head_ages().values())


def test_head_dtype_and_state_roundtrip():
    disc, make_cond, channels = make("digits", head_backend="eager")
    state = copy.deepcopy(disc.heads_state_dict())
    assert all(not k.startswith("backbone") for k in state)
    other, _, _ = make("digits", head_backend="eager")
    other.load_heads_state_dict(state)
    for k, v in other.heads_state_dict().items():
        assert torch.equal(v, state[k])
    d64, _, _ = make("digits", head_backend="eager", head_dtype=torch.float64)
    out = d64.g_loss(latents(2, channels), make_cond(2), make_cond(2, True))
    assert out.g_loss.dtype == torch.float64


def test_state_dict_leaves_out_the_frozen_backbone():
    disc, _, _ = make("digits", head_backend="eager")
    state = disc.state_dict()
    backbone_keys = set(disc.backbone.state_dict())
    assert state and all(k.startswith(("pools.", "ages.")) for k in state), sorted(state)[:5]
    assert not backbone_keys & {k.split(".", 1)[1] for k in state}
    assert {id(p) for p in disc.parameters()} == {id(p) for p in disc.head_parameters()}
    # the module state and the heads-only state hold the same tensors
    heads = disc.heads_state_dict()
    assert {k.split(".", 1)[1] for k in state if k.startswith("pools.")} == {k for k in heads if not k.startswith("ages.")}
    other, _, _ = make("digits", head_backend="eager")
    other.load_state_dict(copy.deepcopy(state))  # strict: no missing backbone keys
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(RuntimeError, match="backbone"):
        other.load_state_dict({**state, "backbone.conv_in.weight": torch.zeros(1)})
    # .to() still moves / casts the backbone along with the heads
    disc.to(torch.float64)
    assert disc.backbone.conv_in.weight.dtype == torch.float64
    assert next(disc.head_parameters()).dtype == torch.float64
    assert "backbone=" in repr(disc)


def test_default_sizing_on_a_small_unet_suggests_the_sizing_arguments():
    unet = tiny_digits_unet()  # 16x16 latents: maps 16 and 8, too small for local_size=8
    with pytest.raises(ValueError, match=r"local_size=4 .*resolution=.*pool_sizes=") as err:
        DynamicDiscriminator(unet)
    assert "local_unconditional': 0" in str(err.value)
    disc = DynamicDiscriminator(unet, local_size=4, hidden=16, num_groups=4, pool_sizes=1)  # the suggestion works
    assert disc.num_heads > 0
    with pytest.raises(ValueError, match=r"Global heads.*resolution=.*'global_conditional': 0"):
        DynamicDiscriminator(unet, resolution=12, pool_sizes={"global_conditional": 1}, hidden=16, num_groups=4)
