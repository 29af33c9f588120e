"""Bad input to the public API (issue 12): a clear error naming the argument, never a crash or a silent wrong
result. Classes: crash (sparse rows out of range), silent wrong results (processor on an unsupported Attention,
re-cut per-level lists, truncated num_groups, ambiguous scheduler timesteps, non-finite settings), unclear
errors (dtype/device mismatches, mask shapes, eps types, constructor arguments, model mismatches)."""
import copy
import math

import pytest
import torch
from torch import nn

from nitrokernels.optim import SampledAdamW
from nitrokernels.ops.optim import sampled_adamw_


# ------------------------------------------------------------------------------------------ optimiser
def _param():
    return nn.Parameter(torch.randn(4, 3))


@pytest.mark.parametrize("rows", [[0, 4], [-1, 2], [7]])
def test_sparse_gradient_rows_out_of_range_are_refused_before_any_kernel(rows):
    p = _param()
    before = p.detach().clone()
    p.grad = torch.sparse_coo_tensor(torch.tensor([rows]), torch.randn(len(rows), 3), (4, 3), check_invariants=False)
    opt = SampledAdamW([p], lr=0.1)
    with pytest.raises(ValueError, match=r"sparse grad 0 has row indices in .*outside the parameter's rows \[0, 4\)"):
        opt.step()
    assert torch.equal(p.detach(), before)
    # the functional op checks too
    state = (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="outside the parameter's rows"):
        sampled_adamw_([p.detach()], [p.grad], [state[0]], [state[1]], [state[2]], lr=1e-3, beta1=0.9, beta2=0.99,
                       eps=1e-8, weight_decay=0.0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=math.inf), ValueError, "lr .* must be finite"),
    (dict(lr=math.nan), ValueError, "lr .* must be finite"),
    (dict(lr="0.1"), TypeError, "lr .* must be a real number, got str"),
    (dict(lr=torch.tensor(0.1)), TypeError, "lr must be a float, not a tensor"),
    (dict(weight_decay=math.inf), ValueError, "weight_decay must be finite"),
    (dict(weight_decay=None), TypeError, "weight_decay must be a real number"),
    (dict(eps=-1e-8), ValueError, "eps must be >= 0"),
    (dict(eps=math.nan), ValueError, "eps must be finite"),
    (dict(betas=(0.9, 1.5)), ValueError, r"betas\[1\] .* must be in \[0, 1\)"),
    (dict(betas=(math.nan, 0.9)), ValueError, r"betas\[0\]"),
    (dict(betas=(0.9,)), ValueError, "invalid betas"),
    (dict(betas="ab"), ValueError, "invalid betas"),
    (dict(betas=("a", 0.9)), TypeError, r"betas\[0\] .* must be a real number"),
])
def test_sampled_adamw_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        SampledAdamW([_param()], **kwargs)


def test_hyperparameters_changed_later_are_checked_at_step():
    p = _param()
    p.grad = torch.randn(4, 3)
    opt = SampledAdamW([p])
    opt.param_groups[0]["lr"] = math.nan
    with pytest.raises(ValueError, match="lr .* must be finite"):
        opt.step()


# ------------------------------------------------------------------------------------------ DistillConfig
@pytest.mark.parametrize("field, value, match", [
    ("teacher_guidance", math.nan, "teacher_guidance must be a finite number"),
    ("teacher_guidance", "2", "teacher_guidance must be a finite number"),
    ("lr_student", math.inf, "lr_student must be a finite number"),
    ("lr_heads", math.nan, "lr_heads must be a finite number"),
    ("weight_decay_heads", math.inf, "weight_decay_heads must be a finite number"),
    ("weight_decay_student", -1.0, "weight_decay_student must be >= 0"),
    ("betas_heads", (0.9, 1.2), r"betas_heads must be two numbers in \[0, 1\)"),
    ("betas_student", (0.9,), "betas_student must be two numbers"),
    ("betas_student", 0.9, "betas_student must be two numbers"),
    ("shift", math.nan, "shift must be a finite number"),
    ("grad_clip", math.nan, "grad_clip must be > 0"),
    ("grad_clip", "1", "grad_clip must be a number or None"),
    ("ema_decay", math.nan, "ema_decay must be in"),
    ("seed", -1, "seed must be an int"),
    ("seed", 2 ** 64, "seed must be an int"),
    ("seed", 1.5, "seed must be an int"),
    ("device", "bogus", "device 'bogus' is not a torch device"),
    ("resume", "yes", "resume must be True or False"),
    ("out_dir", 3, "out_dir must be a path"),
])
def test_distill_config_refuses_bad_settings(field, value, match):
    from nitrokernels.nitro.distiller import DistillConfig

    with pytest.raises(ValueError, match=match):
        DistillConfig(**{field: value})


# ------------------------------------------------------------------------------------------ models
def _tiny_unet(seed=0, **overrides):
    from nitrokernels.digits import data as digits

    torch.manual_seed(seed)
    config = dict(block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4)
    return digits.make_digits_unet(**{**config, **overrides})


def _bank(width=8, uncond=True):
    from nitrokernels.nitro.distiller import PromptBank

    return PromptBank({"encoder_hidden_states": torch.randn(10, 1, width)},
                      {"encoder_hidden_states": torch.randn(1, 1, width)} if uncond else None)


def test_distiller_checks_models_at_construction():
    from nitrokernels.digits import data as digits
    from nitrokernels.nitro.distiller import DistillConfig, NitroDistiller

    teacher = _tiny_unet()
    config = DistillConfig(steps=1, batch_size=2, progress=False, device="cpu",
                           discriminator=dict(pool_sizes=1, hidden=16, num_groups=4, local_size=4,
                                              head_backend="eager"))
    sched = digits.make_teacher_scheduler()
    with pytest.raises(ValueError, match="student in_channels=2 but teacher in_channels=1"):
        NitroDistiller(teacher, _tiny_unet(in_channels=2), sched, _bank(), config)
    with pytest.raises(ValueError, match="student cross_attention_dim=12 but teacher cross_attention_dim=8"):
        NitroDistiller(teacher, _tiny_unet(cross_attention_dim=12), sched, _bank(), config)
    with pytest.raises(ValueError, match=r"cond encoder_hidden_states have width 6 .* teacher's cross_attention_dim is 8"):
        NitroDistiller(teacher, copy.deepcopy(teacher), sched, _bank(width=6), config)
    with pytest.raises(TypeError, match="prompts must be a PromptBank"):
        NitroDistiller(teacher, copy.deepcopy(teacher), sched, None, config)
    with pytest.raises(TypeError, match="teacher_scheduler must be a diffusers scheduler"):
        NitroDistiller(teacher, copy.deepcopy(teacher), None, _bank(), config)
    with pytest.raises(ValueError, match="teacher_guidance=2.0 needs the empty prompt"):
        NitroDistiller(teacher, copy.deepcopy(teacher), sched, _bank(uncond=False),
                       DistillConfig(**{**config.__dict__, "teacher_guidance": 2.0}))
    with pytest.raises(TypeError, match="config must be a DistillConfig"):
        NitroDistiller(teacher, copy.deepcopy(teacher), sched, _bank(), dict(steps=1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_groups=2.5), "num_groups must be a positive int, got 2.5"),
    (dict(hidden="16"), "hidden must be a positive int"),
    (dict(local_size=0), "local_size must be a positive int"),
    (dict(t_star=(10.5, 250)), r"t_star values must be ints, got \[10.5\]"),
    (dict(resolution=16.5), "resolution must be a positive int or None"),
    (dict(head_dtype="float32"), "head_dtype must be a floating torch.dtype"),
])
def test_discriminator_constructor_arguments(kwargs, match):
    from nitrokernels.nitro.discriminator import DynamicDiscriminator

    base = dict(pool_sizes=1, hidden=16, num_groups=4, local_size=4, head_backend="eager")
    with pytest.raises(ValueError, match=match):
        DynamicDiscriminator(_tiny_unet(), **{**base, **kwargs})


def test_head_pool_levels_must_be_int_pairs():
    from nitrokernels.nn.head_pool import HeadPool

    with pytest.raises(ValueError, match="int pairs"):
        HeadPool(levels=[(8.5, 16)], hidden=16, num_groups=4)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        HeadPool(levels=[(8, 16)], hidden=16, num_groups=4, eps="1e-5")


# ------------------------------------------------------------------------------------------ heads op
def _pool(pool, channels, size, hidden, depth, k=1, batch=2):
    feature = torch.randn(batch, channels, size, size)
    conv_w, conv_b, norm_w, norm_b, c_in = [], [], [], [], channels
    for _ in range(depth):
        conv_w.append(torch.randn(pool, hidden, c_in, 4, 4) * 0.1)
        conv_b.append(torch.randn(pool, hidden) * 0.1)
        norm_w.append(torch.ones(pool, hidden))
        norm_b.append(torch.zeros(pool, hidden))
        c_in = hidden
    return feature, conv_w, conv_b, norm_w, norm_b, torch.randn(pool, 1, hidden, k, k), torch.randn(pool, 1)


def test_head_levels_refuses_a_re_cut_of_per_level_lists_and_a_fractional_num_groups():
    from nitrokernels.ops.heads import head_levels, head_stack

    a = _pool(3, 4, 16, 8, 2)   # level 0: depth 2
    b = _pool(3, 4, 8, 8, 1)    # level 1: depth 1
    levels = list(zip(a, b))
    feats, cw, cb, nw, nb, fw, fb = (list(x) for x in levels)
    ids, counts = torch.tensor([0, 1, 2]), [2, 1]
    good = head_levels(feats, cw, cb, nw, nb, fw, fb, ids, counts, num_groups=4)
    assert good.shape[0] == 3
    moved = [cb[0][:1], cb[0][1:] + cb[1]]  # same tensor count, cut differently: used to run with the wrong biases
    with pytest.raises(ValueError, match=r"conv_biases has 1 tensors at level 0 .* conv_weights\[0\] has 2"):
        head_levels(feats, cw, moved, nw, nb, fw, fb, ids, counts, num_groups=4)
    with pytest.raises(ValueError, match="norm_biases has 3 entries for 2 levels"):
        head_levels(feats, cw, cb, nw, nb + [nb[0]], fw, fb, ids, counts, num_groups=4)
    with pytest.raises(ValueError, match="num_groups must be a positive int, got 2.5"):
        head_levels(feats, cw, cb, nw, nb, fw, fb, ids, counts, num_groups=2.5)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        head_levels(feats, cw, cb, nw, nb, fw, fb, ids, counts, num_groups=4, eps="1e-5")
    with pytest.raises(ValueError, match=r"counts\[0\] must be an int"):
        head_levels(feats, cw, cb, nw, nb, fw, fb, ids, [1.5, 1.5], num_groups=4)
    with pytest.raises(ValueError, match="num_groups must be a positive int, got 2.5"):
        head_stack(*a, torch.tensor([0, 1]), 2.5)


# ------------------------------------------------------------------------------------------ scheduler
def test_lcm_mode_refuses_an_ambiguous_first_timestep():
    from nitrokernels.nitro.scheduler import TimestepShiftLCMScheduler

    x = torch.randn(1, 1, 4, 4)
    sched = TimestepShiftLCMScheduler(shift=250, timesteps_mode="lcm")
    sched.set_timesteps(4)
    assert sched.lcm_timesteps.tolist() == [999, 749, 499, 249] and sched.model_timesteps.tolist()[0] == 249
    # 249 is step 0's model timestep and step 3's LCM timestep: which one is meant cannot be told
    with pytest.raises(ValueError, match="timestep 249 is ambiguous.*step 3's LCM timestep and step 0's model"):
        sched.step(x, 249, x)
    out = sched.step(x, 249, x, step_index=0, generator=torch.Generator().manual_seed(0))
    assert sched.step_index == 1
    ref = TimestepShiftLCMScheduler(shift=250, timesteps_mode="lcm")
    ref.set_timesteps(4)
    torch.testing.assert_close(out.denoised, ref.step(x, 999, x, generator=torch.Generator().manual_seed(0)).denoised)
    with pytest.raises(ValueError, match=r"step_index must be an int in \[0, 4\)"):
        sched.step(x, 249, x, step_index=4)
    # the exposed first timestep of a pipeline loop stays accepted (model mode: .timesteps[0] = 249)
    model = TimestepShiftLCMScheduler(shift=250)
    model.set_timesteps(4)
    model.step(x, int(model.timesteps[0]), x)
    assert model.step_index == 1


# ------------------------------------------------------------------------------------------ fused modules
def test_attn_processor_on_an_added_kv_attention_computes_the_original():
    from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0

    from nitrokernels.nn.attention import NitroAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=8, added_kv_proj_dim=6, heads=2, dim_head=4,
                     norm_num_groups=2)
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 6)
    attn.set_processor(AttnAddedKVProcessor2_0())
    expected = attn(x, encoder_hidden_states=ctx)
    attn.set_processor(NitroAttnProcessor())
    torch.testing.assert_close(attn(x, encoder_hidden_states=ctx), expected)


def test_attn_processor_refuses_a_module_without_to_out():
    from diffusers.models.attention_processor import Attention

    from nitrokernels.nn.attention import NitroAttnProcessor

    attn = Attention(query_dim=8, heads=2, dim_head=4)
    attn.to_out = None
    with pytest.raises(NotImplementedError, match="pre_only attention"):
        NitroAttnProcessor()(attn, torch.randn(1, 3, 8))


def test_attention_mask_and_argument_errors():
    from nitrokernels.ops.attention import attention

    q = torch.randn(2, 2, 5, 4)
    k = torch.randn(2, 2, 7, 4)
    attention(q, k, k, attn_mask=torch.zeros(2, 1, 1, 7))  # broadcastable: fine
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 2, 5, 6\) does not broadcast to .*\[2, 2, 5, 7\]"):
        attention(q, k, k, attn_mask=torch.zeros(2, 2, 5, 6))
    with pytest.raises(ValueError, match="attn_mask of shape"):
        attention(q, k, k, attn_mask=torch.zeros(3, 1, 1, 7))
    with pytest.raises(ValueError, match="attn_mask is on meta"):
        attention(q, k, k, attn_mask=torch.zeros(2, 1, 1, 7, device="meta"))
    with pytest.raises(ValueError, match="dropout_p must be a number"):
        attention(q, k, k, dropout_p="0.1")
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, k.double(), k)


def test_geglu_dtype_mismatch_names_the_dtypes():
    from nitrokernels.ops.geglu import geglu

    x, w, b = torch.randn(2, 6), torch.randn(8, 6), torch.randn(8)
    with pytest.raises(TypeError, match="x torch.float32, weight torch.float64"):
        geglu(x, w.double(), b)
    with pytest.raises(TypeError, match="bias torch.float16"):
        geglu(x, w, b.half())
    with pytest.raises(TypeError, match="x must be floating point"):
        geglu(x.long(), w.long())
    with pytest.raises(ValueError, match="one device"):
        geglu(x, w, b.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast mixed dtypes are cast, as F.linear does
        assert geglu(x, w.double(), b).dtype == torch.bfloat16


def test_group_norm_arguments():
    from nitrokernels.nn.group_norm import GroupNormSiLU
    from nitrokernels.ops.group_norm import group_norm_silu

    with pytest.raises(ValueError, match="num_groups must be a positive int, got 0"):
        GroupNormSiLU(0, 8)
    with pytest.raises(ValueError, match="num_groups must be a positive int, got 2.5"):
        GroupNormSiLU(2.5, 10)
    with pytest.raises(ValueError, match="num_channels must be a positive int"):
        GroupNormSiLU(2, "8")
    with pytest.raises(ValueError, match="eps must be a finite number"):
        GroupNormSiLU(2, 8, eps="1e-5")
    with pytest.raises(TypeError, match="expected an nn.GroupNorm, got Linear"):
        GroupNormSiLU.from_group_norm(nn.Linear(4, 4))
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got 'abc'"):
        group_norm_silu(x, 2, eps="abc")
    with pytest.raises(ValueError, match="num_groups must be a positive int, got 2.5"):
        group_norm_silu(x, 2.5)
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has torch.float32"):
        group_norm_silu(x, 2, torch.ones(8, dtype=torch.float64))


def test_removed_layer_norm_op_is_deprecated_to_torchs():
    """ops.layer_norm was torch's F.layer_norm under another name (nothing used it): the old name still works, with
    a DeprecationWarning, and no longer registers a dispatched op."""
    import torch.nn.functional as F

    import nitrokernels.ops as ops
    from nitrokernels.ops import dispatch

    with pytest.warns(DeprecationWarning, match="torch.nn.functional.layer_norm"):
        assert ops.layer_norm is F.layer_norm
    assert "layer_norm" not in dispatch.REGISTRY
    with pytest.raises(AttributeError):
        ops.no_such_op  # noqa: B018


def test_sample_one_to_four_is_a_deprecated_alias_of_sample():
    pytest.importorskip("diffusers")
    from nitrokernels.nitro import sample, sample_one_to_four
    from nitrokernels.nitro.scheduler import TimestepShiftLCMScheduler

    noise = torch.randn(1, 2, 4, 4)
    expected = sample(lambda x, t: 0.5 * x, TimestepShiftLCMScheduler(), noise, 2, torch.Generator().manual_seed(0))
    with pytest.warns(DeprecationWarning, match="use nitrokernels.nitro.sample"):
        got = sample_one_to_four(lambda x, t: 0.5 * x, TimestepShiftLCMScheduler(), noise, 2,
                                 torch.Generator().manual_seed(0))
    assert torch.equal(got, expected)


def test_fused_geglu_honours_a_hook_added_after_fusing():
    from diffusers.models.activations import GEGLU

    from nitrokernels.nn.geglu import FusedGEGLU

    torch.manual_seed(0)
    original = GEGLU(6, 4)
    fused = FusedGEGLU.from_diffusers(original)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(fused(x), original(x))
    original.proj.register_forward_hook(lambda m, i, o: o * 2)  # e.g. an adapter / casting hook added later
    torch.testing.assert_close(fused(x), original(x))


def test_fused_resnet_block_honours_changes_made_after_fusing():
    pytest.importorskip("diffusers")
    from test_resnet_block import block_inputs, make_block  # the resnet tests' own block and inputs

    from nitrokernels.nn.resnet import fuse_resnet_block

    torch.manual_seed(0)
    block, (x, temb) = make_block("same_channels").eval(), block_inputs("same_channels", size=4)
    with torch.no_grad():
        expected = block(x, temb)
        fuse_resnet_block(block)
        torch.testing.assert_close(block(x, temb), expected, rtol=1e-5, atol=1e-5)  # fused = original, then:
        block.norm2.register_forward_hook(lambda m, i, o: o + 1)
        changed = type(block).forward(block, x, temb)
        assert not torch.allclose(changed, expected)
        torch.testing.assert_close(block(x, temb), changed)
        block.norm2._forward_hooks.clear()
        block.nonlinearity = nn.GELU()
        torch.testing.assert_close(block(x, temb), type(block).forward(block, x, temb))


def test_scheduler_refuses_broadcasting_and_bad_scaling():
    from nitrokernels.nitro.scheduler import TimestepShiftLCMScheduler

    sched = TimestepShiftLCMScheduler(shift=250)
    sched.set_timesteps(1)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"one shape .* got \(2, 4, 8, 8\) and \(1, 4, 8, 8\)"):
        sched.step(torch.randn(2, 4, 8, 8), int(sched.timesteps[0]), x)  # used to broadcast to a batch of 2
    with pytest.raises(ValueError, match="noise has shape"):
        sched.add_noise(x, torch.randn(1, 4, 8, 1), 10)
    with pytest.raises(ValueError, match="timestep_scaling"):
        TimestepShiftLCMScheduler(timestep_scaling=math.inf)


def test_discriminator_checks_its_inputs_against_the_backbone():
    from nitrokernels.nitro.discriminator import DynamicDiscriminator

    disc = DynamicDiscriminator(_tiny_unet(), pool_sizes=1, hidden=16, num_groups=4, local_size=4,
                                head_backend="eager")
    size = disc.resolution
    x = torch.randn(2, 1, size, size)
    with pytest.raises(ValueError, match="width 6 .* cross_attention_dim is 8"):
        disc.features(x, 10, encoder_hidden_states=torch.randn(2, 1, 6))
    with pytest.raises(ValueError, match="sample has 3 channels, the backbone's in_channels is 1"):
        disc.features(torch.randn(2, 3, size, size), 10, encoder_hidden_states=torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match="encoder_hidden_states have batch 3, the sample 2"):
        disc.features(x, 10, encoder_hidden_states=torch.randn(3, 1, 8))


def test_distiller_checks_grid_prompts_and_train_steps():
    from nitrokernels.digits import data as digits
    from nitrokernels.nitro.distiller import DistillConfig, NitroDistiller

    teacher = _tiny_unet()
    config = DistillConfig(steps=1, batch_size=2, progress=False, device="cpu", sample_count=3,
                           discriminator=dict(pool_sizes=1, hidden=16, num_groups=4, local_size=4,
                                              head_backend="eager"))

    def build(**kwargs):
        return NitroDistiller(teacher, copy.deepcopy(teacher), digits.make_teacher_scheduler(), _bank(), config,
                              **kwargs)

    with pytest.raises(ValueError, match=r"grid_prompts must lie in \[0, 10\)"):
        build(grid_prompts=[0, 1, 10])
    with pytest.raises(ValueError, match="grid_prompts must be 3"):
        build(grid_prompts=[0, 1])
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        build().train(steps="5")


def test_distiller_checks_a_given_discriminator_against_the_student():
    from nitrokernels.digits import data as digits
    from nitrokernels.nitro.discriminator import DynamicDiscriminator
    from nitrokernels.nitro.distiller import DistillConfig, NitroDistiller

    teacher = _tiny_unet()
    other = DynamicDiscriminator(_tiny_unet(in_channels=2), pool_sizes=1, hidden=16, num_groups=4, local_size=4)
    config = DistillConfig(steps=1, batch_size=2, progress=False, device="cpu")
    with pytest.raises(ValueError, match="backbone has in_channels=2 but the student has in_channels=1"):
        NitroDistiller(teacher, copy.deepcopy(teacher), digits.make_teacher_scheduler(), _bank(), config,
                       discriminator=other)
    with pytest.raises(TypeError, match="discriminator must be a DynamicDiscriminator"):
        NitroDistiller(teacher, copy.deepcopy(teacher), digits.make_teacher_scheduler(), _bank(), config,
                       discriminator=nn.Linear(2, 2))
