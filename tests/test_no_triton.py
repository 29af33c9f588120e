"""The eager-only install (issue 12): with Triton absent -- macOS and Windows, where the package does not install
it -- DynamicDiscriminator forward/backward, distiller iterations, a patched UNet and `nitrokernels demo` work.

Triton is hidden in a fresh interpreter by replacing the path finder with one that does not see `triton`, which is
exactly what an environment without the package looks like (find_spec returns None, import raises
ModuleNotFoundError); the script then asserts `triton` was never imported.
"""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import importlib.machinery, sys

    class NoTriton(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)

    sys.meta_path[:] = [NoTriton if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    try:
        import triton  # noqa: F401
        raise SystemExit("triton is still importable")
    except ModuleNotFoundError:
        pass

    import copy, tempfile
    import torch
    from nitrokernels.digits import data as digits
    from nitrokernels.nitro.discriminator import DynamicDiscriminator
    from nitrokernels.nitro.distiller import DistillConfig, NitroDistiller, PromptBank
    from nitrokernels.patch import patch_unet

    torch.manual_seed(0)
    unet = digits.make_digits_unet(block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                   attention_head_dim=4)
    enc = digits.DigitsEncoder(dim=8)
    size = unet.config.sample_size
    with torch.no_grad():
        cond = {"encoder_hidden_states": enc(torch.arange(2))}
        uncond = {"encoder_hidden_states": enc.empty(2)}

    disc = DynamicDiscriminator(unet, pool_sizes=1, hidden=16, num_groups=4, local_size=4)
    fake = torch.randn(2, 1, size, size, requires_grad=True)
    out = disc.d_loss(torch.randn(2, 1, size, size), fake, cond, uncond)
    out.d_loss.backward()
    assert torch.isfinite(out.d_loss) and all(p.grad is not None for p in disc.head_parameters() if p.requires_grad)
    g = disc.g_loss(fake, cond, uncond).g_loss
    g.backward()
    assert fake.grad is not None and torch.isfinite(fake.grad).all()

    with torch.no_grad():
        bank = PromptBank({"encoder_hidden_states": enc(torch.arange(10))}, {"encoder_hidden_states": enc.empty(1)})
    config = DistillConfig(steps=2, batch_size=2, teacher_steps=2, progress=False, device="cpu",
                           discriminator=dict(pool_sizes=1, hidden=16, num_groups=4, local_size=4))
    distiller = NitroDistiller(unet, copy.deepcopy(unet), digits.make_teacher_scheduler(), bank, config)
    distiller.train()
    assert distiller.step == 2

    patched = copy.deepcopy(unet)
    patch_unet(patched)
    x, t = torch.randn(2, 1, size, size), torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(patched(x, t, **cond).sample, unet(x, t, **cond).sample, rtol=1e-4, atol=1e-4)

    from nitrokernels import cli
    rc = cli.main(["demo", "--quick", "--steps", "2", "--eval-per-class", "2", "--out", tempfile.mkdtemp(),
                   "--no-progress", "--device", "cpu"])
    assert rc == 0, rc
    assert "triton" not in sys.modules, "something imported triton"
    print("EAGER-ONLY OK")
""")


def test_eager_paths_work_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "EAGER-ONLY OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
