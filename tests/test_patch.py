"""patch_unet / patch_vae on tiny SD1.5-, SD2- and SDXL-style diffusers models with random weights.

Patched vs unpatched: same outputs and gradients (parameters and inputs) with the fused ops' eager and
Triton (interpreter on the CPU) backends; revert() gives bit-identical outputs and the original objects back;
the report; strict errors; double patching; torch.compile without graph breaks; the VAE.
"""
import copy
import logging

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402

import nitrokernels as nk  # noqa: E402
from nitrokernels.ops.dispatch import triton_importable, use_backend  # noqa: E402
from nitrokernels.patch import AlreadyPatchedError, UnsupportedBlockError  # noqa: E402

# Tiny configs with the structure of each family. In diffusers, `attention_head_dim` is the number of heads
# (legacy naming): 32 / 1 and 64 / 2 give head dim 32, which the Triton attention kernel supports. Channels
# and the 8x8 sample are as small as the structure allows: Triton runs under its (slow) interpreter on a CPU.
_COMMON = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
               norm_num_groups=4)
CONFIGS = {
    "sd15": dict(_COMMON, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=(1, 2)),
    "sd2": dict(_COMMON, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
                attention_head_dim=(1, 2), use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(_COMMON, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=40,
                 attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8),
}
BACKENDS = ["eager", pytest.param("triton", marks=pytest.mark.skipif(not triton_importable(),
                                                                       reason="triton is not installed"))]


def make_unet(kind: str) -> UNet2DConditionModel:
    return UNet2DConditionModel(**CONFIGS[kind]).float()


def make_inputs(kind: str, batch: int = 2, size: int = 8) -> dict:
    cfg = CONFIGS[kind]
    inputs = dict(sample=torch.randn(batch, 4, size, size),
                  timestep=torch.tensor([17, 503][:batch] + [900] * max(0, batch - 2)),
                  encoder_hidden_states=torch.randn(batch, 7, cfg["cross_attention_dim"]))
    if cfg.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 16),
                                           time_ids=torch.tensor([[size * 8.0, size * 8.0, 0, 0, size * 8.0,
                                                                   size * 8.0]] * batch))
    return inputs


def forward_and_grads(model, inputs, params, grad_out=None):
    """Output, and gradients of <output, grad_out> w.r.t. the float inputs and `params` (in that order)."""
    leaf_inputs = {k: (v.detach().clone().requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point()
                       else v) for k, v in inputs.items()}
    out = model(**leaf_inputs).sample
    if grad_out is None:
        grad_out = torch.randn_like(out)
    wrt = [v for v in leaf_inputs.values() if torch.is_tensor(v) and v.requires_grad] + list(params)
    grads = torch.autograd.grad(out, wrt, grad_out, allow_unused=True)
    return out.detach(), grads, grad_out


def assert_close(actual, expected, rel=2e-4, name="tensor"):
    assert actual is not None and expected is not None, f"{name}: missing gradient"
    scale = expected.abs().max().item() or 1.0
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale + 1e-6, f"{name}: max error {err:.3g} > {rel:g} * max|ref| {scale:.3g}"


def snapshot(model):
    """Everything revert() must restore: module objects, processors, instance forwards, parameters."""
    return dict(modules={n: m for n, m in model.named_modules()},
                processors=dict(model.attn_processors),
                forwards={n: m.__dict__.get("forward") for n, m in model.named_modules()},
                params={n: p for n, p in model.named_parameters()})


def assert_same_snapshot(before, after):
    assert after["modules"].keys() == before["modules"].keys()
    for name, module in before["modules"].items():
        assert after["modules"][name] is module, f"module {name} was not restored"
    for name, proc in before["processors"].items():
        assert after["processors"][name] is proc, f"processor {name} was not restored"
    for name, fwd in before["forwards"].items():
        assert after["forwards"][name] is fwd, f"forward of {name} was not restored"
    for name, p in before["params"].items():
        assert after["params"][name] is p, f"parameter {name} was not restored"


# -------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_patched_matches_unpatched_and_revert_is_exact(kind, backend):
    unet = make_unet(kind).train()
    inputs = make_inputs(kind)
    params = [p for _, p in unet.named_parameters()]
    ref_out, ref_grads, grad_out = forward_and_grads(unet, inputs, params)
    before = snapshot(unet)

    handle = nk.patch_unet(unet)
    assert not handle.skipped, handle.summary()
    with use_backend(backend):
        out, grads, _ = forward_and_grads(unet, inputs, params, grad_out)
    assert_close(out, ref_out, name=f"{kind}/{backend} output")
    names = [k for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point()]
    names += [n for n, _ in unet.named_parameters()]
    for name, g, ref in zip(names, grads, ref_grads):
        if ref is None:
            assert g is None or not g.abs().any(), f"{name}: gradient where the original has none"
            continue
        assert_close(g, ref, name=f"{kind}/{backend} grad {name}")

    handle.revert()
    assert_same_snapshot(before, snapshot(unet))
    again_out, again_grads, _ = forward_and_grads(unet, inputs, params, grad_out)
    assert torch.equal(again_out, ref_out)
    for g, ref in zip(again_grads, ref_grads):
        assert (g is None and ref is None) or torch.equal(g, ref)


def test_patched_unet_channels_last_inference():
    unet = make_unet("sdxl").eval().to(memory_format=torch.channels_last)
    inputs = make_inputs("sdxl", batch=1)
    inputs["sample"] = inputs["sample"].to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = unet(**inputs).sample
        with nk.patch_unet(unet):
            out = unet(**inputs).sample
    assert_close(out, ref, name="channels_last output")


def test_patched_unet_with_encoder_attention_mask():
    """A padding mask on the text tokens (cross-attention mask): the processor's mask semantics are kept."""
    unet = make_unet("sd2").eval()
    inputs = make_inputs("sd2")
    mask = torch.ones(2, 7)
    mask[0, 4:] = 0
    mask[1, 1:3] = 0
    with torch.no_grad():
        ref = unet(**inputs, encoder_attention_mask=mask).sample
        unmasked = unet(**inputs).sample
        with nk.patch_unet(unet):
            out = unet(**inputs, encoder_attention_mask=mask).sample
    assert not torch.allclose(ref, unmasked, atol=1e-4)  # the mask matters for this input
    assert_close(out, ref, name="masked output")


def test_state_dict_unchanged_and_parameters_shared():
    unet = make_unet("sdxl")
    keys = list(unet.state_dict().keys())
    params = {n: p for n, p in unet.named_parameters()}
    with nk.patch_unet(unet) as handle:
        assert list(unet.state_dict().keys()) == keys
        for name, p in unet.named_parameters():
            assert p is params[name], f"{name} is a new tensor; patched modules must share the original parameters"
        # A checkpoint saved from the patched model loads into a fresh unpatched one and vice versa.
        fresh = make_unet("sdxl")
        fresh.load_state_dict(unet.state_dict())
        unet.load_state_dict(fresh.state_dict())
    assert handle.reverted


# ------------------------------------------------------------------------------------------- report
def test_report_lists_every_block():
    unet = make_unet("sdxl")
    n_attn = len(unet.attn_processors)
    n_geglu = sum(type(m).__name__ == "GEGLU" for m in unet.modules())
    n_resnet = sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
    handle = nk.patch_unet(unet)
    assert handle.counts() == {"attention": (n_attn, n_attn), "geglu": (n_geglu, n_geglu),
                               "resnet": (n_resnet, n_resnet), "group_norm_silu": (1, 1)}
    paths = {(path, what) for path, what, _ in handle.report}
    assert ("down_blocks.1.attentions.0.transformer_blocks.1.attn2", "attention") in paths
    assert ("mid_block.attentions.0.transformer_blocks.0.ff.net.0", "geglu") in paths
    assert ("up_blocks.1.resnets.0", "resnet") in paths
    assert ("conv_norm_out+conv_act", "group_norm_silu") in paths
    assert all(status == "patched" for _, _, status in handle.report)
    assert f"attention {n_attn}/{n_attn}" in handle.summary()
    handle.revert()


def test_flags_select_what_is_patched():
    unet = make_unet("sd15")
    handle = nk.patch_unet(unet, attention=False, group_norm=False)
    assert set(handle.counts()) == {"geglu"}
    assert all(type(p).__name__ != "NitroAttnProcessor" for p in unet.attn_processors.values())
    handle.revert()
    handle = nk.patch_unet(unet, geglu=False, group_norm=False)
    assert set(handle.counts()) == {"attention"}
    assert all(type(p).__name__ == "NitroAttnProcessor" for p in unet.attn_processors.values())
    handle.revert()


# --------------------------------------------------------------------------- unsupported blocks / strict
class _CustomProcessor(AttnProcessor):
    """A user's processor: subclasses a stock one but may do anything; must be kept."""


def test_unet_flags_are_keywords_and_old_positions_are_deprecated():
    """patch_unet(unet, *, attention, group_norm, geglu, strict): flags by position keep their old meaning
    (attention, group_norm, geglu, strict) with a DeprecationWarning naming the keywords to use."""
    import inspect

    params = inspect.signature(nk.patch_unet).parameters
    assert [p for p in params if params[p].kind is params[p].KEYWORD_ONLY] == ["attention", "group_norm", "geglu",
                                                                               "strict"]
    unet = make_unet("sd15")
    with pytest.warns(DeprecationWarning, match=r"patch_unet\(model, attention=False, group_norm=False\)"):
        handle = nk.patch_unet(unet, False, False)
    assert set(handle.counts()) == {"geglu"}
    handle.revert()
    with pytest.warns(DeprecationWarning, match="geglu=False"):
        handle = nk.patch_unet(unet, True, False, False)
    assert set(handle.counts()) == {"attention"}
    handle.revert()
    with pytest.raises(TypeError, match="attention both by position and by keyword"):
        nk.patch_unet(unet, True, attention=False)
    with pytest.raises(TypeError, match="5 flags by position"):
        nk.patch_unet(unet, True, True, True, False, True)


def test_custom_processor_is_kept_and_strict_raises(caplog):
    unet = make_unet("sd15")
    custom_path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    custom = _CustomProcessor()
    unet.get_submodule(custom_path).set_processor(custom)
    plain = AttnProcessor()  # the classic processor is an equivalent that NitroAttnProcessor replaces
    unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn2").set_processor(plain)
    before = snapshot(unet)

    with pytest.raises(UnsupportedBlockError) as err:
        nk.patch_unet(unet, strict=True)
    assert custom_path in str(err.value) and "_CustomProcessor" in str(err.value)
    assert_same_snapshot(before, snapshot(unet))  # strict mode changed nothing

    with caplog.at_level(logging.INFO, logger="nitrokernels"):
        handle = nk.patch_unet(unet)
    assert unet.get_submodule(custom_path).processor is custom
    assert type(unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn2").processor).__name__ \
        == "NitroAttnProcessor"
    skipped = handle.skipped
    assert [(p, w) for p, w, _ in skipped] == [(custom_path, "attention")]
    assert "_CustomProcessor" in skipped[0][2]
    assert any(custom_path in rec.getMessage() for rec in caplog.records)
    handle.revert()
    assert_same_snapshot(before, snapshot(unet))


def test_added_kv_attention_is_skipped():
    cfg = dict(CONFIGS["sd15"], mid_block_type="UNetMidBlock2DSimpleCrossAttn")
    unet = UNet2DConditionModel(**cfg)
    original = unet.mid_block.attentions[0].processor
    inputs = make_inputs("sd15")
    with torch.no_grad(), use_backend("eager"):
        ref = unet(**inputs).sample
        with nk.patch_unet(unet) as handle:
            reasons = {path: status for path, what, status in handle.report if what == "attention"}
            assert "added KV" in reasons["mid_block.attentions.0"]
            assert unet.mid_block.attentions[0].processor is original
            out = unet(**inputs).sample
    assert_close(out, ref, name="added-KV unet output")
    with pytest.raises(UnsupportedBlockError, match="mid_block.attentions.0"):
        nk.patch_unet(unet, strict=True)


def test_hooked_modules_are_skipped():
    unet = make_unet("sd15")
    geglu_path = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0"
    calls = []
    unet.get_submodule(geglu_path).register_forward_hook(lambda *a: calls.append(1))
    unet.conv_act.register_forward_hook(lambda *a: calls.append(2))
    with nk.patch_unet(unet) as handle, use_backend("eager"):
        status = {(p, w): s for p, w, s in handle.report}
        assert "hook" in status[(geglu_path, "geglu")]
        assert "hook" in status[("conv_norm_out+conv_act", "group_norm_silu")]
        with torch.no_grad():
            unet(**make_inputs("sd15"))
        assert sorted(set(calls)) == [1, 2]  # the hooks still fire


def test_patching_twice_is_refused():
    unet = make_unet("sd15")
    handle = nk.patch_unet(unet)
    with pytest.raises(AlreadyPatchedError, match="revert"):
        nk.patch_unet(unet)
    with pytest.raises(AlreadyPatchedError, match="already patched"):
        nk.patch_unet(unet.down_blocks[0])  # a part of a patched model
    handle.revert()
    handle.revert()  # idempotent
    nk.patch_unet(unet).revert()  # after revert it can be patched again

    inner = nk.patch_unet(unet.down_blocks[0])
    with pytest.raises(AlreadyPatchedError, match="down_blocks.0"):
        nk.patch_unet(unet)  # a model containing a patched part
    inner.revert()


def test_patch_deepcopy_of_patched_model_is_independent():
    unet = make_unet("sd15")
    with nk.patch_unet(unet):
        clone = copy.deepcopy(unet)
    # The copy keeps the fused blocks (it was taken while patched) and is not tied to the handle.
    assert any(type(p).__name__ == "NitroAttnProcessor" for p in clone.attn_processors.values())
    assert all(type(p).__name__ != "NitroAttnProcessor" for p in unet.attn_processors.values())


# ---------------------------------------------------------------------------------------- torch.compile
def test_compiled_patched_unet_has_no_graph_breaks_and_matches():
    """torch.compile(aot_eager, fullgraph=False) of a patched SDXL-style UNet: no graph break anywhere
    (training forward+backward, then no_grad inference), same outputs and gradients as the unpatched UNet."""
    from torch._dynamo.utils import counters

    unet = make_unet("sdxl").train()
    inputs = make_inputs("sdxl", batch=1)
    params = [p for _, p in unet.named_parameters()]
    ref_out, ref_grads, grad_out = forward_and_grads(unet, inputs, params)
    torch._dynamo.reset()
    counters.clear()
    try:
        with nk.patch_unet(unet):
            compiled = torch.compile(unet, backend="aot_eager", fullgraph=False)
            out, grads, _ = forward_and_grads(compiled, inputs, params, grad_out)
            with torch.no_grad():
                inference = compiled(**inputs).sample
        breaks = dict(counters["graph_break"])
        assert not breaks, f"graph breaks: {breaks}"
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # one per grad mode
    finally:
        torch._dynamo.reset()
    assert_close(out, ref_out, name="compiled output")
    assert_close(inference, ref_out, name="compiled no_grad output")
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        if ref is not None:
            assert_close(g, ref, name=f"compiled grad {i}")


def test_patch_through_a_compiled_wrapper():
    unet = make_unet("sd15")
    compiled = torch.compile(unet, backend="aot_eager")
    with nk.patch_unet(compiled) as handle:  # patches the wrapped module; paths are the model's own
        assert not handle.skipped
        assert handle.model is unet
        assert not any(path.startswith("_orig_mod") for path, _, _ in handle.report)
        assert all(type(p).__name__ == "NitroAttnProcessor" for p in unet.attn_processors.values())
    assert all(type(p).__name__ != "NitroAttnProcessor" for p in unet.attn_processors.values())


# ------------------------------------------------------------------------------------------------ VAE
def make_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16).float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_vae_matches_unpatched(backend):
    vae = make_vae().eval()
    z = torch.randn(1, 4, 8, 8)
    image = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref_dec = vae.decode(z).sample
        ref_enc = vae.encode(image).latent_dist.mean
    before = snapshot(vae)
    handle = nk.patch_vae(vae)
    counts = handle.counts()
    assert counts["attention"] == (2, 2)            # encoder and decoder mid-block attention
    assert counts["group_norm_silu"] == (2, 2)      # encoder and decoder conv_norm_out + conv_act
    assert counts["resnet"][0] > 0 and "geglu" not in counts
    with torch.no_grad(), use_backend(backend):
        dec = vae.decode(z).sample
        enc = vae.encode(image).latent_dist.mean
    assert_close(dec, ref_dec, name="decoder output")
    assert_close(enc, ref_enc, name="encoder output")

    # gradients through the decoder (the part a one-step pipeline backpropagates through, e.g. for a loss)
    zz = z.clone().requires_grad_(True)
    with use_backend(backend):
        grad_patched = torch.autograd.grad(vae.decode(zz).sample.square().sum(), zz)[0]
    handle.revert()
    assert_same_snapshot(before, snapshot(vae))
    zz = z.clone().requires_grad_(True)
    grad_ref = torch.autograd.grad(vae.decode(zz).sample.square().sum(), zz)[0]
    assert_close(grad_patched, grad_ref, name="decoder input grad")
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, ref_dec)


def test_vae_flags_are_keywords_and_old_positions_are_deprecated():
    """patch_vae(vae, *, attention, group_norm, strict) in patch_unet's order; its old positional order was
    (group_norm, attention, strict), and a positional flag still means what it meant, with a DeprecationWarning."""
    import inspect

    params = inspect.signature(nk.patch_vae).parameters
    assert [p for p in params if params[p].kind is params[p].KEYWORD_ONLY] == ["attention", "group_norm", "strict"]
    vae = make_vae().eval()
    handle = nk.patch_vae(vae, attention=False)
    assert "attention" not in handle.counts() and "resnet" in handle.counts()
    handle.revert()
    with pytest.warns(DeprecationWarning, match=r"patch_vae\(model, group_norm=False\)"):
        handle = nk.patch_vae(vae, False)  # the old first flag was group_norm
    assert set(handle.counts()) == {"attention"}
    handle.revert()
    with pytest.warns(DeprecationWarning, match="group_norm=True, attention=False"):
        handle = nk.patch_vae(vae, True, False)
    assert "attention" not in handle.counts() and "group_norm_silu" in handle.counts()
    handle.revert()
