"""A patched model in the diffusers / PEFT / accelerate world: what the user does AFTER patch_unet / patch_vae.

Every case runs the same thing on an unpatched copy and compares (fp32, tight tolerances): layerwise casting,
LoRA (add / load / set_adapters / fuse / unfuse / unload / hot-swap), accelerate's sequential cpu_offload,
diffusers' group offloading (leaf and block level), gradient checkpointing, torch.compile, FlopCounterMode,
set_default_attn_processor, torch.save / torch.load, deepcopy + unpatch, load_state_dict(assign=True) + revert,
a processor installed after patching. Where a fused block had to run the original computation, the handle's
`fallbacks` must name the reason.
"""
import copy
import io
import logging

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402

import nitrokernels as nk  # noqa: E402
from nitrokernels.nn.attention import NitroAttnProcessor  # noqa: E402
from nitrokernels.nn.geglu import FusedGEGLU  # noqa: E402
from nitrokernels.nn.group_norm import GroupNormSiLU  # noqa: E402
from nitrokernels.ops.dispatch import use_backend  # noqa: E402
from nitrokernels.patch import AlreadyPatchedError, unpatch  # noqa: E402

from test_patch import assert_close, make_inputs, make_unet, make_vae  # noqa: E402

TIGHT = 2e-5  # fp32: the fused kernels against diffusers' ops on the same weights


@pytest.fixture(autouse=True)
def _eager_kernels(request):
    """Most cases run the fused ops' eager backends (seconds instead of the Triton interpreter's minutes): the
    call-time decisions under test are the same whatever backend runs. Cases parametrized with
    backend="default" run the dispatcher's own choice (Triton under TRITON_INTERPRET=1 on a CPU)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "default":
        yield
        return
    with use_backend("eager"):
        yield


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _decode(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample


def _fused_blocks(model):
    """How many nitrokernels pieces the model carries."""
    n = 0
    for m in model.modules():
        n += isinstance(m, (FusedGEGLU, GroupNormSiLU))
        n += type(m.__dict__.get("forward")).__name__ == "_FusedForward"
        n += type(m.__dict__.get("processor")) is NitroAttnProcessor
    return n


def _fallback_reasons(handle, what=None):
    return [reason for _, w, reason, _ in handle.fallbacks if what is None or w == what]


def _pair(kind="sd15"):
    """(unpatched reference, patched copy with the same weights, handle)."""
    ref = make_unet(kind).eval()
    unet = copy.deepcopy(ref)
    handle = nk.patch_unet(unet)
    assert not handle.skipped, handle.summary()
    return ref, unet, handle


# ------------------------------------------------------------------------------------- layerwise casting
def _storage_dtype():
    try:
        x = torch.randn(4).to(torch.float8_e4m3fn)
        x.to(torch.float32)
        return torch.float8_e4m3fn
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - older torch
        return torch.bfloat16


@pytest.mark.parametrize("kind,backend", [("sd15", "default"), ("sdxl", "eager")])
def test_layerwise_casting_after_patching(kind, backend):
    ref, unet, handle = _pair(kind)
    inputs = make_inputs(kind)
    _out(unet, inputs)  # the fused paths ran (and are decided again at every call)
    storage = _storage_dtype()
    for model in (ref, unet):
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    assert_close(_out(unet, inputs), _out(ref, inputs), rel=TIGHT, name=f"layerwise casting {storage}")
    reasons = _fallback_reasons(handle, "geglu")
    assert reasons and all("proj.forward was replaced" in r for r in reasons), handle.summary()
    assert "fell back geglu" in handle.summary()
    handle.revert()
    assert_close(_out(unet, inputs), _out(ref, inputs), rel=TIGHT, name="reverted")


def test_layerwise_casting_vae():
    ref = make_vae().eval()
    vae = copy.deepcopy(ref)
    handle = nk.patch_vae(vae)
    z = torch.randn(1, 4, 8, 8)
    for model in (ref, vae):
        model.enable_layerwise_casting(storage_dtype=_storage_dtype(), compute_dtype=torch.float32)
    assert_close(_decode(vae, z), _decode(ref, z), rel=TIGHT, name="vae layerwise casting")
    handle.revert()


# --------------------------------------------------------------------------------------------------- LoRA
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj", "ff.net.2", "conv1", "conv2"]


def _lora(r=4):
    # init_lora_weights=False: B is random too, so every adapter changes the output
    LoraConfig = pytest.importorskip("peft").LoraConfig
    return LoraConfig(r=r, lora_alpha=r, target_modules=LORA_TARGETS, init_lora_weights=False)


def _add_same_adapter(ref, unet, name="default", r=4):
    ref.add_adapter(_lora(r=r), adapter_name=name)
    unet.add_adapter(_lora(r=r), adapter_name=name)
    # the same adapter weights in both (state-dict keys are unchanged by patching); only the adapter's tensors
    # are written: a copy into the base weights would bump their versions and hide a stale fused-QKV cache
    lora = {k: v for k, v in ref.state_dict().items() if "lora_" in k}
    assert lora
    missing, unexpected = unet.load_state_dict(lora, strict=False)
    assert not unexpected


def test_lora_added_after_patching_is_honoured(caplog):
    ref, unet, handle = _pair("sd15")
    inputs = make_inputs("sd15")
    before = _out(ref, inputs)
    _add_same_adapter(ref, unet)
    expected = _out(ref, inputs)
    assert not torch.allclose(expected, before, atol=1e-3)  # the adapter matters
    with caplog.at_level(logging.INFO, logger="nitrokernels"):
        assert_close(_out(unet, inputs), expected, rel=TIGHT, name="lora output")
    assert any("ran the original computation" in rec.getMessage() and "lora" in rec.getMessage().lower()
               for rec in caplog.records)
    assert any("lora" in r.lower() for r in _fallback_reasons(handle, "geglu")), handle.summary()
    assert any("to_q" in r for r in _fallback_reasons(handle, "attention")), handle.summary()

    # set_adapters with two adapters and weights, then disable / enable
    _add_same_adapter(ref, unet, name="second", r=2)
    for model in (ref, unet):
        model.set_adapters(["default", "second"], weights=[0.5, 1.5])
    assert_close(_out(unet, inputs), _out(ref, inputs), rel=TIGHT, name="set_adapters output")
    for model in (ref, unet):
        model.disable_adapters()
    assert_close(_out(unet, inputs), before, rel=TIGHT, name="adapters disabled")
    for model in (ref, unet):
        model.enable_adapters()
    assert_close(_out(unet, inputs), _out(ref, inputs), rel=TIGHT, name="adapters enabled")

    # revert keeps the adapters (proj was wrapped by the LoRA layer: the restored GEGLU holds the wrapper)
    handle.revert()
    assert_close(_out(unet, inputs), _out(ref, inputs), rel=TIGHT, name="reverted with adapters")


def test_fuse_unfuse_unload_lora_after_inference():
    """patch -> infer -> add_adapter -> fuse_lora -> (infer) -> unfuse -> fuse -> unload_lora -> infer: peft's
    merge writes through `.data` (no version bump): a fused-QKV cache keyed on versions would serve old weights."""
    ref, unet, handle = _pair("sd15")
    inputs = make_inputs("sd15")
    assert_close(_out(unet, inputs), _out(ref, inputs), rel=TIGHT, name="before adapters")
    _add_same_adapter(ref, unet)
    with_adapter = _out(ref, inputs)
    for model in (ref, unet):
        model.fuse_lora()
    assert_close(_out(unet, inputs), _out(ref, inputs), rel=TIGHT, name="fused lora")
    assert_close(_out(unet, inputs), with_adapter, rel=1e-4, name="fused lora == unfused adapter")
    for model in (ref, unet):
        model.unfuse_lora()
    assert_close(_out(unet, inputs), with_adapter, rel=TIGHT, name="unfused lora")
    for model in (ref, unet):
        model.fuse_lora()
        model.unload_lora()  # merged weights stay, the LoRA layers go: plain nn.Linear again
    assert all(type(m).__name__ != "Linear" or type(m) is torch.nn.Linear for m in unet.modules())
    expected = _out(ref, inputs)
    assert not torch.allclose(expected, _out(make_unet("sd15").eval(), inputs), atol=1e-3)
    assert_close(_out(unet, inputs), expected, rel=TIGHT, name="after fuse_lora + unload_lora")
    handle.revert()


def test_patch_infer_add_adapter_fuse_unload_infer():
    """The exact sequence of the issue: patch -> infer -> add_adapter -> fuse_lora -> unload_lora -> infer."""
    ref, unet, handle = _pair("sd15")
    inputs = make_inputs("sd15")
    _out(unet, inputs)
    _add_same_adapter(ref, unet)
    for model in (ref, unet):
        model.fuse_lora()
        model.unload_lora()
    assert_close(_out(unet, inputs), _out(ref, inputs), rel=TIGHT, name="fuse_lora + unload_lora")
    handle.revert()
    assert_close(_out(unet, inputs), _out(ref, inputs), rel=TIGHT, name="reverted")


def test_load_lora_adapter_and_hotswap():
    get_peft_model_state_dict = pytest.importorskip("peft.utils").get_peft_model_state_dict

    donor = make_unet("sd15")
    donor.add_adapter(_lora(r=4), adapter_name="a")
    sd_a = {k: v.clone() for k, v in get_peft_model_state_dict(donor, adapter_name="a").items()}
    sd_b = {k: torch.randn_like(v) * 0.1 for k, v in sd_a.items()}

    ref, unet, handle = _pair("sd15")
    inputs = make_inputs("sd15")
    _out(unet, inputs)
    for model in (ref, unet):
        model.load_lora_adapter(dict(sd_a), adapter_name="x", prefix=None)
    assert_close(_out(unet, inputs), _out(ref, inputs), rel=TIGHT, name="load_lora_adapter")
    first = _out(ref, inputs)
    for model in (ref, unet):
        model.load_lora_adapter(dict(sd_b), adapter_name="x", prefix=None, hotswap=True)
    second = _out(ref, inputs)
    assert not torch.allclose(first, second, atol=1e-3)
    assert_close(_out(unet, inputs), second, rel=TIGHT, name="hot-swapped adapter")
    handle.revert()


# ----------------------------------------------------------------------------------------------- offload
def test_accelerate_sequential_cpu_offload():
    cpu_offload = pytest.importorskip("accelerate").cpu_offload

    ref, unet, handle = _pair("sd15")
    inputs = make_inputs("sd15")
    expected = _out(ref, inputs)
    cpu_offload(unet, execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in unet.parameters())  # offloaded: weights arrive through hooks
    assert_close(_out(unet, inputs), expected, rel=TIGHT, name="cpu_offload output")
    resnet = _fallback_reasons(handle, "resnet")
    assert resnet and all("norm1" in r or "nonlinearity" in r for r in resnet), handle.summary()
    assert _fallback_reasons(handle, "geglu"), handle.summary()


def test_patch_after_cpu_offload_skips_hooked_blocks():
    """Offloaded first, patched afterwards: blocks whose bypassed modules carry accelerate's hooks are skipped
    (with the reason), the rest is patched, and the output is right."""
    cpu_offload = pytest.importorskip("accelerate").cpu_offload
    ref = make_unet("sd15").eval()
    unet = copy.deepcopy(ref)
    inputs = make_inputs("sd15")
    expected = _out(ref, inputs)
    cpu_offload(unet, execution_device=torch.device("cpu"))
    handle = nk.patch_unet(unet)
    skipped = {what: reason for _, what, reason in handle.skipped}
    assert {"resnet", "geglu", "group_norm_silu"} <= set(skipped), handle.summary()
    assert_close(_out(unet, inputs), expected, rel=TIGHT, name="offloaded then patched")
    handle.revert()


def test_accelerate_cpu_offload_vae():
    cpu_offload = pytest.importorskip("accelerate").cpu_offload

    ref = make_vae().eval()
    vae = copy.deepcopy(ref)
    handle = nk.patch_vae(vae)
    z = torch.randn(1, 4, 8, 8)
    expected = _decode(ref, z)
    cpu_offload(vae, execution_device=torch.device("cpu"))
    assert_close(_decode(vae, z), expected, rel=TIGHT, name="vae cpu_offload")
    assert _fallback_reasons(handle, "resnet"), handle.summary()


@pytest.mark.parametrize("offload_type", ["leaf_level", "block_level"])
def test_group_offloading(offload_type):
    ref, unet, handle = _pair("sdxl")
    inputs = make_inputs("sdxl")
    expected = _out(ref, inputs)
    kwargs = dict(num_blocks_per_group=1) if offload_type == "block_level" else {}
    unet.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                              offload_type=offload_type, **kwargs)
    assert_close(_out(unet, inputs), expected, rel=TIGHT, name=f"group offload {offload_type}")
    if offload_type == "leaf_level":  # every leaf with parameters is hooked: norm1 / norm2 / proj are bypassed
        assert _fallback_reasons(handle, "resnet") and _fallback_reasons(handle, "geglu"), handle.summary()


# ---------------------------------------------------------------------------------------- autograd tools
def _grads(model, inputs, grad_out, names):
    """Output and the gradients of <output, grad_out> w.r.t. the sample and the named parameters, by .backward()
    (FlopCounterMode's module tracker does not support autograd.grad with leaf inputs)."""
    leaf = {k: (v.detach().clone().requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in inputs.items()}
    model.zero_grad(set_to_none=True)
    out = model(**leaf).sample
    (out * grad_out).sum().backward()
    params = dict(getattr(model, "_orig_mod", model).named_parameters())
    return out.detach(), [leaf["sample"].grad] + [params[n].grad for n in names]


_GRAD_PARAMS = ["conv_in.weight", "down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.resnets.0.norm2.bias",
                "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight", "conv_norm_out.weight"]


def _compare_grads(got, expected, what):
    out, grads = got
    ref_out, ref_grads = expected
    assert_close(out, ref_out, rel=TIGHT, name=f"{what} output")
    for name, g, r in zip(["sample"] + _GRAD_PARAMS, grads, ref_grads):
        assert_close(g, r, rel=1e-4, name=f"{what} grad {name}")


@pytest.mark.parametrize("backend", ["eager", "default"])
def test_gradient_checkpointing(backend):
    ref, unet, handle = _pair("sd15")
    for model in (ref, unet):
        model.train()
        model.enable_gradient_checkpointing()
    inputs = make_inputs("sd15", batch=1)
    grad_out = torch.randn(1, 4, 8, 8)
    expected = _grads(ref, inputs, grad_out, _GRAD_PARAMS)
    got = _grads(unet, inputs, grad_out, _GRAD_PARAMS)
    _compare_grads(got, expected, f"checkpointed/{backend}")
    assert not handle.fallbacks, handle.summary()


@pytest.mark.parametrize("backend", ["eager", "default"])
def test_flop_counter_backward(backend):
    from torch.utils.flop_counter import FlopCounterMode

    ref, unet, handle = _pair("sd15")
    ref.train(), unet.train()
    inputs = make_inputs("sd15", batch=1)
    grad_out = torch.randn(1, 4, 8, 8)
    expected = _grads(ref, inputs, grad_out, _GRAD_PARAMS)
    counter = FlopCounterMode(display=False)
    with counter:
        got = _grads(unet, inputs, grad_out, _GRAD_PARAMS)
    _compare_grads(got, expected, f"FlopCounterMode/{backend}")
    assert counter.get_total_flops() > 0


def test_compile_aot_eager_backward_eager_group_norm():
    """torch.compile(aot_eager) of a patched UNet, training step with the eager GroupNorm+SiLU backend (its
    backward runs inside the custom op's backward under AOTAutograd)."""
    ref, unet, handle = _pair("sd15")
    ref.train(), unet.train()
    inputs = make_inputs("sd15", batch=1)
    grad_out = torch.randn(1, 4, 8, 8)
    expected = _grads(ref, inputs, grad_out, _GRAD_PARAMS)
    torch._dynamo.reset()
    try:
        with use_backend("eager"):
            got = _grads(torch.compile(unet, backend="aot_eager"), inputs, grad_out, _GRAD_PARAMS)
    finally:
        torch._dynamo.reset()
    _compare_grads(got, expected, "compiled aot_eager")


def test_compile_inductor_patched_resnet_block():
    """One inductor case, kept small: a patched ResnetBlock2D, forward + backward, eager GroupNorm backend."""
    from diffusers.models.resnet import ResnetBlock2D

    pytest.importorskip("torch._inductor")
    block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4).train()
    ref = copy.deepcopy(block)
    handle = nk.patch_unet(block)
    assert handle.patched == [("", "resnet")]
    x, temb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    g = torch.randn(2, 16, 6, 6)

    def run(module):
        xx = x.clone().requires_grad_(True)
        out = module(xx, temb)
        return [out.detach()] + list(torch.autograd.grad(out, [xx, module.norm1.weight, module.norm2.bias], g))

    expected = run(ref)
    torch._dynamo.reset()
    try:
        with use_backend("eager"):
            got = run(torch.compile(block, backend="inductor"))
    finally:
        torch._dynamo.reset()
    for a, b in zip(got, expected):
        assert_close(a, b, rel=1e-4, name="inductor")


# --------------------------------------------------------------------------------------------- diffusers APIs
def test_set_default_attn_processor_on_patched_models():
    ref, unet, handle = _pair("sd15")
    inputs = make_inputs("sd15")
    unet.set_default_attn_processor()
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    assert_close(_out(unet, inputs), _out(ref, inputs), rel=TIGHT, name="default processors")
    handle.revert()  # the user's choice is kept: revert replaces only nitrokernels' processors
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())

    vae = make_vae().eval()
    with nk.patch_vae(vae):
        vae.set_default_attn_processor()
        assert all(type(p) is AttnProcessor for p in vae.attn_processors.values())


def test_revert_keeps_a_processor_installed_after_patching():
    ref, unet, handle = _pair("sd15")
    originals = dict(ref.attn_processors)
    before = {k: p for k, p in copy.copy(unet).attn_processors.items()}
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    mine = AttnProcessor2_0()
    unet.set_attn_processor({**unet.attn_processors, key: mine})
    handle.revert()
    after = unet.attn_processors
    assert after[key] is mine
    assert all(type(p) is type(originals[k]) for k, p in after.items() if k != key)
    assert not any(type(p) is NitroAttnProcessor for p in after.values()) and before
    inputs = make_inputs("sd15")
    assert_close(_out(unet, inputs), _out(ref, inputs), rel=TIGHT, name="after revert")


@pytest.mark.parametrize("which", ["unet", "vae"])
def test_torch_save_and_load_of_patched_model(which):
    if which == "unet":
        ref = make_unet("sdxl").eval()
        inputs = make_inputs("sdxl")
        run = (lambda m: _out(m, inputs))
        patch = nk.patch_unet
    else:
        ref = make_vae().eval()
        z = torch.randn(1, 4, 8, 8)
        run = (lambda m: _decode(m, z))
        patch = nk.patch_vae
    model = copy.deepcopy(ref)
    handle = patch(model)
    patched_out = run(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert _fused_blocks(loaded) > 0  # still fused after loading
    assert torch.equal(run(loaded), patched_out)
    assert unpatch(loaded) > 0 and _fused_blocks(loaded) == 0
    assert_close(run(loaded), run(ref), rel=TIGHT, name="unpatched loaded copy")
    handle.revert()
    assert _fused_blocks(model) == 0


def test_deepcopy_of_patched_model_can_be_unpatched():
    ref, unet, handle = _pair("sd15")
    inputs = make_inputs("sd15")
    clone = copy.deepcopy(unet)
    n = _fused_blocks(clone)
    assert n > 0
    with pytest.raises(AlreadyPatchedError, match="unpatch"):
        nk.patch_unet(clone)  # the copy carries fused blocks no handle owns
    assert unpatch(clone) > 0 and _fused_blocks(clone) == 0
    assert all(type(p) is AttnProcessor2_0 for p in clone.attn_processors.values())
    assert_close(_out(clone, inputs), _out(ref, inputs), rel=TIGHT, name="unpatched copy")
    again = nk.patch_unet(clone)  # and can be patched again
    assert not again.skipped
    again.revert()
    handle.revert()
    assert _fused_blocks(unet) == 0


@pytest.mark.parametrize("which", ["unet", "vae"])
def test_load_state_dict_assign_then_revert(which):
    if which == "unet":
        model, fresh = make_unet("sdxl").eval(), make_unet("sdxl").eval()
        inputs = make_inputs("sdxl")
        run = (lambda m: _out(m, inputs))
        handle = nk.patch_unet(model)
    else:
        model, fresh = make_vae().eval(), make_vae().eval()
        z = torch.randn(1, 4, 8, 8)
        run = (lambda m: _decode(m, z))
        handle = nk.patch_vae(model)
    with torch.no_grad():  # make the norms matter (diffusers initialises them to 1 / 0)
        for m in fresh.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_()
    expected = run(fresh)
    run(model)
    model.load_state_dict(fresh.state_dict(), assign=True)
    assert_close(run(model), expected, rel=TIGHT, name="assigned while patched")
    handle.revert()
    assert _fused_blocks(model) == 0
    assert_close(run(model), expected, rel=TIGHT, name="assigned then reverted")
    for name, p in model.named_parameters():
        assert torch.equal(p, fresh.state_dict()[name]), name


def test_weights_written_through_data_are_seen():
    """A write through `.data` (no version bump) between two inferences: the patched model sees it."""
    ref, unet, handle = _pair("sd15")
    inputs = make_inputs("sd15")
    _out(unet, inputs)
    for model in (ref, unet):
        attn = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        attn.to_k.weight.data.mul_(3.0)
        attn.to_v.weight.data.add_(0.5)
    assert_close(_out(unet, inputs), _out(ref, inputs), rel=TIGHT, name="after .data writes")
    handle.revert()
