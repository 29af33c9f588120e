"""fuse_resnet_block on diffusers ResnetBlock2D: same outputs and gradients as the original forward, exact undo,
unsupported settings refused with their reason, a tiny UNet2DConditionModel fused everywhere, torch.compile."""
import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

from nitrokernels import testing  # noqa: E402
from nitrokernels.nn.resnet import fuse_resnet_block, resnet_block_unsupported_reason  # noqa: E402
from nitrokernels.ops import use_backend  # noqa: E402

BACKENDS = ["eager", "triton", pytest.param("cuda_ext", marks=pytest.mark.gpu)]

BLOCKS = {  # ResnetBlock2D settings, each small (Triton runs interpreted on a CPU)
    "shortcut": dict(in_channels=8, out_channels=12, temb_channels=10, groups=4, eps=1e-6),
    "same_channels": dict(in_channels=8, temb_channels=6, groups=2),
    "scaled_skip_act": dict(in_channels=8, out_channels=8, temb_channels=6, groups=4, output_scale_factor=2.0,
                            skip_time_act=True, conv_shortcut=True),
    "up": dict(in_channels=8, out_channels=4, temb_channels=6, groups=2, up=True),
    "down_fir": dict(in_channels=4, temb_channels=6, groups=2, down=True, kernel="fir"),
    "no_temb": dict(in_channels=8, out_channels=4, temb_channels=None, groups=4, groups_out=2),
}


def make_block(name, device="cpu", dtype=torch.float32):
    block = ResnetBlock2D(**BLOCKS[name]).to(device=device, dtype=dtype)
    with torch.no_grad():  # non-trivial norm affine parameters
        for norm in (block.norm1, block.norm2):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
    return block


def block_inputs(name, batch=2, size=6, device="cpu", dtype=torch.float32):
    cfg = BLOCKS[name]
    x = testing.random_tensor((batch, cfg["in_channels"], size, size), device=device, dtype=dtype)
    temb = None
    if cfg.get("temb_channels") is not None:
        temb = testing.random_tensor((batch, cfg["temb_channels"]), device=device, dtype=dtype)
    return x, temb


def forward_and_grads(block, x, temb, grad_out=None):
    x = x.detach().clone().requires_grad_()
    temb = temb.detach().clone().requires_grad_() if temb is not None else None
    out = block(x, temb)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    wrt = [x] + ([temb] if temb is not None else []) + list(block.parameters())
    grads = torch.autograd.grad(out, wrt, grad_out)
    return out.detach(), grads, grad_out


def assert_close(actual, expected, rel=1e-4, name="tensor"):
    scale = expected.abs().max().item() or 1.0
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale + 1e-6, f"{name}: max error {err:.3g} > {rel:g} * max|ref| {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_fused_block_matches_original(name, backend, device):
    block = make_block(name, device)
    x, temb = block_inputs(name, device=device)
    assert resnet_block_unsupported_reason(block) is None
    out_ref, grads_ref, grad_out = forward_and_grads(block, x, temb)
    undo = fuse_resnet_block(block)
    with use_backend(backend, "group_norm_silu"):
        out, grads, _ = forward_and_grads(block, x, temb, grad_out)
    assert_close(out, out_ref, name="output")
    names = ["x"] + (["temb"] if temb is not None else []) + [n for n, _ in block.named_parameters()]
    for n, g, r in zip(names, grads, grads_ref):
        assert_close(g, r, rel=2e-4, name=f"grad {n}")
    undo()
    out_after, _, _ = forward_and_grads(block, x, temb, grad_out)
    assert torch.equal(out_after, out_ref), "undo must restore the original forward bit for bit"
    assert "forward" not in block.__dict__


def test_undo_is_exact_and_idempotent():
    block = make_block("shortcut")
    x, temb = block_inputs("shortcut")
    with torch.no_grad():
        before = block(x, temb)
        state = {k: v.clone() for k, v in block.state_dict().items()}
        undo = fuse_resnet_block(block)
        assert block.forward.__func__.__name__ == "_fused_forward"
        assert block.state_dict().keys() == state.keys()
        undo()
        undo()
        assert torch.equal(block(x, temb), before)
    assert type(block).forward is ResnetBlock2D.forward and "forward" not in block.__dict__
    fuse_resnet_block(block)()  # can be fused again after undo


def test_eval_with_dropout_and_deprecated_scale_argument():
    block = ResnetBlock2D(in_channels=4, temb_channels=4, groups=2, dropout=0.5).eval()
    x, temb = torch.randn(1, 4, 5, 5), torch.randn(1, 4)
    with torch.no_grad():
        ref = block(x, temb)
        fuse_resnet_block(block)
        torch.testing.assert_close(block(x, temb), ref, rtol=1e-5, atol=1e-5)
        with pytest.warns(FutureWarning):  # the original forward runs (and warns) for the deprecated argument
            torch.testing.assert_close(block(x, temb, scale=1.0), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setting,expected", [
    (dict(non_linearity="mish"), "activation is Mish, not SiLU"),
    (dict(time_embedding_norm="scale_shift"), "scale_shift"),
])
def test_unsupported_settings_are_refused_with_reason(setting, expected):
    block = ResnetBlock2D(in_channels=4, temb_channels=4, groups=2, **setting)
    reason = resnet_block_unsupported_reason(block)
    assert reason is not None and expected in reason
    with pytest.raises(ValueError, match=expected):
        fuse_resnet_block(block)
    assert "forward" not in block.__dict__


def test_other_refusals():
    assert "not a diffusers ResnetBlock2D" in resnet_block_unsupported_reason(nn.Linear(2, 2))
    block = ResnetBlock2D(in_channels=4, temb_channels=4, groups=2)
    block.norm1 = nn.BatchNorm2d(4)
    assert "norm1 is BatchNorm2d" in resnet_block_unsupported_reason(block)
    block = ResnetBlock2D(in_channels=4, temb_channels=4, groups=2)
    handle = block.norm2.register_forward_hook(lambda *a: None)
    assert "hooks on norm2" in resnet_block_unsupported_reason(block)
    handle.remove()
    undo = fuse_resnet_block(block)
    assert "already fused" in resnet_block_unsupported_reason(block)
    with pytest.raises(ValueError, match="already fused"):
        fuse_resnet_block(block)
    undo()

    class Custom(ResnetBlock2D):
        def forward(self, input_tensor, temb, *args, **kwargs):
            return super().forward(input_tensor, temb) * 2

    assert "overrides ResnetBlock2D.forward" in resnet_block_unsupported_reason(Custom(in_channels=4, groups=2))


def test_torch_compile_fused_block_fullgraph(device):
    torch._dynamo.reset()
    block = make_block("shortcut", device)
    x, temb = block_inputs("shortcut", device=device)
    fuse_resnet_block(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out_c, grads_c, grad_out = forward_and_grads(compiled, x, temb)
    out_e, grads_e, _ = forward_and_grads(block, x, temb, grad_out)
    assert_close(out_c, out_e)
    for g, r in zip(grads_c, grads_e):
        assert_close(g, r, rel=2e-4)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ a tiny UNet
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=(1, 2))


def unet_forward_and_grads(unet, inputs, grad_out=None):
    sample = inputs["sample"].detach().clone().requires_grad_()
    ehs = inputs["encoder_hidden_states"].detach().clone().requires_grad_()
    out = unet(sample, inputs["timestep"], encoder_hidden_states=ehs).sample
    if grad_out is None:
        grad_out = torch.randn_like(out)
    params = [p for _, p in unet.named_parameters()]
    grads = torch.autograd.grad(out, [sample, ehs] + params, grad_out, allow_unused=True)
    return out.detach(), grads, grad_out


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_tiny_unet_fused_matches_original(backend, device):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).to(device)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    inputs = dict(sample=torch.randn(2, 4, 8, 8, device=device), timestep=torch.tensor([17, 503], device=device),
                  encoder_hidden_states=torch.randn(2, 5, 16, device=device))
    ref, grads_ref, grad_out = unet_forward_and_grads(unet, inputs)
    blocks = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    assert len(blocks) >= 6 and all(resnet_block_unsupported_reason(b) is None for b in blocks)
    undos = [fuse_resnet_block(b) for b in blocks]
    with use_backend(backend, "group_norm_silu"):
        out, grads, _ = unet_forward_and_grads(unet, inputs, grad_out)
    assert_close(out, ref, rel=2e-4, name="unet output")
    names = ["sample", "encoder_hidden_states"] + [n for n, _ in unet.named_parameters()]
    for n, g, r in zip(names, grads, grads_ref):
        if r is None:
            assert g is None, n
            continue
        assert_close(g, r, rel=5e-4, name=f"grad {n}")
    for undo in undos:
        undo()
    with torch.no_grad():
        again = unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    assert torch.equal(again, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_bf16_block_fused_matches_original(layout):
    block = ResnetBlock2D(in_channels=64, out_channels=128, temb_channels=32, groups=32).cuda().bfloat16()
    x = torch.randn(2, 64, 16, 16, device="cuda", dtype=torch.bfloat16)
    if layout == "channels_last":
        block = block.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    temb = torch.randn(2, 32, device="cuda", dtype=torch.bfloat16)
    ref64 = ResnetBlock2D(in_channels=64, out_channels=128, temb_channels=32, groups=32).double().cuda()
    ref64.load_state_dict(block.state_dict())
    with torch.no_grad():
        exact = ref64(x.double(), temb.double())
        eager = block(x, temb)
        fuse_resnet_block(block)
        fused = block(x, temb)
    testing.assert_close_to_reference(fused, exact, eager, name="fused block")
