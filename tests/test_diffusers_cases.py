"""The cases of diffusers' own model test suites for UNet2DConditionModel and AutoencoderKL (those that run on a
CPU without the Hub), reproduced here and run on an unpatched model and on the same model patched by `patch_unet`
/ `patch_vae`: each case must pass on both, and every output it produces must match between them.

diffusers' test files are not shipped in its wheel or sdist, so CI cannot run them from a pinned snapshot; these
are our own tests of the same behaviours (config variants, save/load, dtype loading, return_dict, training and
gradient checkpointing, attention-processor APIs, slicing / chunking / FreeU / fused QKV, ControlNet residuals,
cross_attention_kwargs, tiling and slicing of the VAE). Hooks, adapters and offloading: tests/test_interop.py.
The fused ops run on their default CPU backend (Triton's interpreter where it applies), as a user's would.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402

import nitrokernels as nk  # noqa: E402
from test_patch import assert_close as assert_close_patched  # noqa: E402

TOL = 2e-4  # relative to the reference's largest magnitude (fp32; the fused kernels reorder sums)

# diffusers' common UNet test config, at the sizes the fused kernels' structure needs (head dim 16 / 32)
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=(1, 2))
UNET_VARIANTS = {
    "base": {},
    "attention_head_dim_int": dict(attention_head_dim=1),
    "linear_projection": dict(use_linear_projection=True),
    "upcast_attention": dict(upcast_attention=True),
    "cross_attention_dim_tuple": dict(cross_attention_dim=(32, 32)),
    "scale_shift_time_norm": dict(resnet_time_scale_shift="scale_shift"),
    "class_embeddings_timestep": dict(class_embed_type="timestep"),
    "class_embeddings_concat": dict(class_embed_type="projection", projection_class_embeddings_input_dim=16,
                                    class_embeddings_concat=True),
    "time_cond_proj": dict(time_cond_proj_dim=8),
    "sdxl_text_time": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                           use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                           projection_class_embeddings_input_dim=16 + 6 * 8),
    "simple_cross_attn_mid": dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn", only_cross_attention=True),
    "no_mid_block": dict(mid_block_type=None),
    "norm_eps": dict(norm_eps=1e-6),
}
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=4,
           down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
           up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16)
VAE_VARIANTS = {
    "base": {},
    "no_quant_convs": dict(use_quant_conv=False, use_post_quant_conv=False),
    "mid_block_without_attention": dict(mid_block_add_attention=False),
}


# ---------------------------------------------------------------------------------------------- helpers
def unet_inputs(config: dict, batch: int = 1) -> dict:
    cross = config.get("cross_attention_dim", 32)
    cross = cross[0] if isinstance(cross, tuple) else cross
    inputs = dict(sample=torch.randn(batch, 4, 8, 8), timestep=torch.tensor([10, 700][:batch]),
                  encoder_hidden_states=torch.randn(batch, 5, cross))
    if config.get("class_embed_type") == "timestep":
        inputs["class_labels"] = torch.tensor([3, 400][:batch])
    if config.get("class_embed_type") == "projection":
        inputs["class_labels"] = torch.randn(batch, config["projection_class_embeddings_input_dim"])
    if config.get("time_cond_proj_dim"):
        inputs["timestep_cond"] = torch.randn(batch, config["time_cond_proj_dim"])
    if config.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 16),
                                           time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch))
    return inputs


def build_unet(variant: str = "base", **extra) -> tuple[UNet2DConditionModel, dict]:
    config = {**UNET, **UNET_VARIANTS[variant], **extra}
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval(), config


def build_vae(variant: str = "base") -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**{**VAE, **VAE_VARIANTS[variant]}).eval()


def set_feed_forward_chunking(model, chunk_size, dim) -> None:
    """What diffusers' enable_forward_chunking does (UNet2DConditionModel has no such method): every
    transformer block runs its feed-forward in chunks of the token dimension."""
    for module in model.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            module.set_chunk_feed_forward(chunk_size, dim)


def assert_close(actual, expected, name, rel=TOL):
    """test_patch's comparison, on detached fp32 copies, after checking that shape and dtype agree."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (name, actual.shape, expected.shape)
    assert_close_patched(actual.detach().float(), expected.detach().float(), rel=rel, name=name)


def patched_pair(model, patch=nk.patch_unet):
    """(the unpatched model, a deep copy of it patched); the patch must have fused something."""
    fused = copy.deepcopy(model)
    handle = patch(fused)
    assert any(status == "patched" for _, _, status in handle.report), handle.summary()
    return model, fused, handle


def run_both(case, model, patch=nk.patch_unet):
    """`case(model) -> {name: tensor}` on the unpatched model and on its patched copy; every output equal."""
    plain, fused, handle = patched_pair(model, patch)
    expected, actual = case(plain), case(fused)
    assert expected.keys() == actual.keys() and expected
    for name in expected:
        assert_close(actual[name], expected[name], name)
    return handle


# ------------------------------------------------------------------------------------------------ UNet
@pytest.mark.parametrize("variant", sorted(UNET_VARIANTS))
def test_unet_config_variant_output(variant):
    """diffusers' test_output and the model_with_* variants: shape, determinism, patched == unpatched."""
    unet, config = build_unet(variant)
    inputs = unet_inputs(config)

    def case(model):
        with torch.no_grad():
            first, second = model(**inputs).sample, model(**inputs).sample
        assert first.shape == inputs["sample"].shape and torch.equal(first, second)
        return {"sample": first}
    run_both(case, unet)


def test_unet_return_dict_false_is_the_same_output():
    unet, config = build_unet()
    inputs = unet_inputs(config)

    def case(model):
        with torch.no_grad():
            tup = model(**inputs, return_dict=False)
            out = model(**inputs).sample
        assert isinstance(tup, tuple) and torch.equal(tup[0], out)
        return {"sample": out}
    run_both(case, unet)


def test_unet_save_pretrained_round_trip_and_sharded(tmp_path):
    """A patched model saves like the original (same keys, same files), sharded too; loading and patching the
    loaded model gives the original's output."""
    unet, config = build_unet()
    inputs = unet_inputs(config)
    plain, fused, _ = patched_pair(unet)
    fused.save_pretrained(tmp_path / "patched", max_shard_size="60KB")
    plain.save_pretrained(tmp_path / "plain")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "patched").eval()
    assert loaded.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert len(list((tmp_path / "patched").glob("*.safetensors"))) > 1   # really sharded
    nk.patch_unet(loaded)
    with torch.no_grad():
        assert_close(loaded(**inputs).sample, plain(**inputs).sample, "loaded+patched")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unet_from_pretrained_dtype(tmp_path, dtype):
    """diffusers' test_from_save_pretrained_dtype: loading in another dtype, then patching, keeps that dtype."""
    unet, _ = build_unet()
    unet.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path, torch_dtype=dtype)
    nk.patch_unet(loaded)
    assert {p.dtype for p in loaded.parameters()} == {dtype}


def test_unet_training_gradients():
    """diffusers' test_training / test_outputs_equivalence with backward: loss and every parameter's gradient."""
    unet, config = build_unet()
    inputs = unet_inputs(config)
    target = torch.randn_like(inputs["sample"])

    def case(model):
        model.train()
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(**inputs).sample, target)
        loss.backward()
        grads = {f"grad.{n}": p.grad for n, p in model.named_parameters()}
        assert all(g is not None for g in grads.values())
        return {"loss": loss.detach(), **grads}
    run_both(case, unet)


def test_unet_gradient_checkpointing_equals_plain_backward():
    """diffusers' test_effective_gradient_checkpointing: with checkpointing on, the same loss and gradients."""
    unet, config = build_unet()
    inputs = unet_inputs(config)
    target = torch.randn_like(inputs["sample"])

    def grads(model):
        model.train()
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(**inputs).sample, target)
        loss.backward()
        return {"loss": loss.detach(), **{f"grad.{n}": p.grad.clone() for n, p in model.named_parameters()}}

    def case(model):
        plain = grads(model)
        model.enable_gradient_checkpointing()
        assert model.is_gradient_checkpointing
        checkpointed = grads(model)
        for name in plain:
            assert_close(checkpointed[name], plain[name], f"checkpointed {name}")
        model.disable_gradient_checkpointing()
        return checkpointed
    run_both(case, unet)


def test_unet_attention_processor_apis():
    """attn_processors lists every attention layer; set_attn_processor (one, or a dict) and
    set_default_attn_processor work on a patched model and give diffusers' outputs."""
    unet, config = build_unet()
    inputs = unet_inputs(config)
    keys = set(unet.attn_processors)

    def case(model):
        assert set(model.attn_processors) == keys
        out = {}
        with torch.no_grad():
            out["patched_or_stock"] = model(**inputs).sample
            model.set_attn_processor({k: AttnProcessor() for k in keys})
            assert all(type(p) is AttnProcessor for p in model.attn_processors.values())
            out["AttnProcessor"] = model(**inputs).sample
            model.set_attn_processor(AttnProcessor2_0())
            out["AttnProcessor2_0"] = model(**inputs).sample
            model.set_default_attn_processor()
            out["default"] = model(**inputs).sample
        return out
    run_both(case, unet)


def test_unet_attention_slicing_forward_chunking_and_freeu():
    """set_attention_slice, enable_forward_chunking (the feed-forward, GEGLU included, run in chunks) and FreeU."""
    unet, config = build_unet()
    inputs = unet_inputs(config)

    def case(model):
        out = {}
        with torch.no_grad():
            model.set_attention_slice(1)  # "auto" halves a 1-head dim to 0 (diffusers bug, unpatched too)
            out["sliced"] = model(**inputs).sample
            model.set_default_attn_processor()
            set_feed_forward_chunking(model, chunk_size=1, dim=1)
            out["chunked"] = model(**inputs).sample
            set_feed_forward_chunking(model, chunk_size=None, dim=0)
            model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
            out["freeu"] = model(**inputs).sample
            model.disable_freeu()
            out["after"] = model(**inputs).sample
        return out
    run_both(case, unet)


def test_unet_fuse_and_unfuse_qkv_projections():
    unet, config = build_unet()
    inputs = unet_inputs(config)

    def case(model):
        out = {}
        with torch.no_grad():
            model.fuse_qkv_projections()
            out["fused_qkv"] = model(**inputs).sample
            model.unfuse_qkv_projections()
            out["unfused"] = model(**inputs).sample
        return out
    run_both(case, unet)


def test_unet_controlnet_residuals_and_cross_attention_kwargs():
    """The ControlNet inputs (down_block_additional_residuals, mid_block_additional_residual), an
    encoder_attention_mask and cross_attention_kwargs={"scale": ...} reach a patched UNet's blocks."""
    from diffusers import ControlNetModel

    unet, config = build_unet()
    inputs = unet_inputs(config, batch=2)  # two prompts: the mask keeps 3 tokens of one, all 5 of the other
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16)).eval()
    with torch.no_grad():
        down, mid = controlnet(**inputs, controlnet_cond=torch.randn(2, 3, 64, 64), return_dict=False)
    # its zero-initialised output convs give zero residuals: perturb them so that they change the output
    residuals = tuple(r + 0.1 * torch.randn_like(r) for r in down)
    mid = mid + 0.1 * torch.randn_like(mid)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)

    def case(model):
        with torch.no_grad():
            return {"controlnet": model(**inputs, down_block_additional_residuals=residuals,
                                        mid_block_additional_residual=mid).sample,
                    "masked": model(**inputs, encoder_attention_mask=mask).sample,
                    "scaled": model(**inputs, cross_attention_kwargs={"scale": 0.5}).sample}
    run_both(case, unet)


def test_unet_channels_last():
    unet, config = build_unet()
    inputs = unet_inputs(config)

    def case(model):
        with torch.no_grad():
            return {"channels_last": model.to(memory_format=torch.channels_last)(**inputs).sample}
    run_both(case, unet)


# ------------------------------------------------------------------------------------------------- VAE
@pytest.mark.parametrize("variant", sorted(VAE_VARIANTS))
def test_vae_config_variant_encode_decode(variant):
    """diffusers' AutoencoderKL test_output: encode's posterior (mean, std) and decode, deterministic."""
    vae = build_vae(variant)
    image = torch.randn(2, 3, 16, 16)

    def case(model):
        with torch.no_grad():
            posterior = model.encode(image).latent_dist
            sample = model(image, sample_posterior=False).sample
            again = model(image, sample_posterior=False).sample
            generated = model(image, sample_posterior=True, generator=torch.Generator().manual_seed(0)).sample
        assert sample.shape == image.shape and torch.equal(sample, again)
        return {"mean": posterior.mean, "std": posterior.std, "sample": sample, "posterior_sample": generated}
    run_both(case, vae, nk.patch_vae)


def test_vae_return_dict_false_tiling_and_slicing():
    vae = build_vae()
    vae.use_tiling = False
    image = torch.randn(2, 3, 32, 32)
    latents = torch.randn(2, 4, 8, 8)

    def case(model):
        out = {}
        with torch.no_grad():
            out["tuple"] = model(image, return_dict=False)[0]
            model.enable_slicing()
            out["sliced_decode"] = model.decode(latents).sample
            model.disable_slicing()
            enable_small_tiles(model)
            out["tiled_encode"] = model.encode(image).latent_dist.mean
            out["tiled_decode"] = model.decode(latents).sample
            model.disable_tiling()
        return out
    run_both(case, vae, nk.patch_vae)


def enable_small_tiles(model) -> None:
    """Tiles of 16 pixels, so that a 32-pixel image is tiled; older diffusers' enable_tiling() takes no sizes."""
    import inspect

    if "tile_sample_min_height" in inspect.signature(model.enable_tiling).parameters:
        model.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=12,
                            tile_sample_stride_width=12)
        return
    model.enable_tiling()
    model.tile_sample_min_size = 16
    model.tile_latent_min_size = 16 // 2 ** (len(model.config.block_out_channels) - 1)


def test_vae_training_gradients_and_checkpointing():
    vae = build_vae()
    image = torch.randn(2, 3, 16, 16)

    def grads(model):
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(image, sample_posterior=False).sample.square().mean()
        loss.backward()
        return {"loss": loss.detach(), **{f"grad.{n}": p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None}}

    def case(model):
        plain = grads(model)
        model.enable_gradient_checkpointing()
        checkpointed = grads(model)
        assert checkpointed.keys() == plain.keys()
        for name in plain:
            assert_close(checkpointed[name], plain[name], f"checkpointed {name}")
        return plain
    run_both(case, vae, nk.patch_vae)


def test_vae_save_pretrained_round_trip(tmp_path):
    vae = build_vae()
    image = torch.randn(1, 3, 16, 16)
    plain, fused, _ = patched_pair(vae, nk.patch_vae)
    fused.save_pretrained(tmp_path)
    loaded = AutoencoderKL.from_pretrained(tmp_path).eval()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in loaded.state_dict().items())
    nk.patch_vae(loaded)
    with torch.no_grad():
        assert_close(loaded(image, sample_posterior=False).sample, plain(image, sample_posterior=False).sample,
                     "loaded+patched")
