"""TimestepShiftLCMScheduler: the NITROFUSION.md table, an independent float64 step-by-step computation from the
formulas, the official NitroFusion demo scheduler (an LCMScheduler subclass), save/load, add_noise, errors."""
import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from nitrokernels.nitro.sampling import sample  # noqa: E402
from nitrokernels.nitro.scheduler import TimestepShiftLCMScheduler  # noqa: E402

# ../shared/NITROFUSION.md, "Inference": steps -> (LCM timesteps, UNet t at shift 250, UNet t at shift 500)
TABLE = {
    1: ([999], [249], [499]),
    2: ([999, 499], [249, 124], [499, 249]),
    4: ([999, 749, 499, 249], [249, 187, 124, 62], [499, 374, 249, 124]),
}
SHIFT_COLUMN = {250: 1, 500: 2}


def reference_alphas_cumprod(beta_start=0.00085, beta_end=0.012, n=1000):
    """Stable Diffusion's scaled_linear schedule, in float64."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def reference_run(model_fn, x_T, lcm, model_t, prediction_type, noise_seed):
    """NitroFusion's shifted LCM sampling written out from the formulas, in float64.

    Returns the per-step (prev_sample, denoised). Noise: standard normal float32 draws from a CPU generator
    seeded with `noise_seed`, one per step except the last (the scheduler's documented contract).
    """
    acp = reference_alphas_cumprod()
    g = torch.Generator().manual_seed(noise_seed)
    x = x_T.double()
    outputs = []
    for i, (t, s) in enumerate(zip(lcm, model_t)):
        m = model_fn(x.float(), s).double()
        a = acp[s]
        if prediction_type == "epsilon":
            x0 = (x - math.sqrt(1 - a) * m) / math.sqrt(a)
        elif prediction_type == "v_prediction":
            x0 = math.sqrt(a) * x - math.sqrt(1 - a) * m
        else:
            x0 = m
        u = 10.0 * s  # LCM boundary condition at the shifted timestep, sigma_data = 0.5
        c_skip = 0.25 / (u * u + 0.25)
        c_out = u / math.sqrt(u * u + 0.25)
        denoised = c_out * x0 + c_skip * x
        if i + 1 < len(lcm):
            z = torch.randn(x.shape, generator=g, dtype=torch.float32).double()
            a_next = acp[lcm[i + 1]]  # re-noise at the ORIGINAL next LCM timestep
            x = math.sqrt(a_next) * denoised + math.sqrt(1 - a_next) * z
        else:
            x = denoised
        outputs.append((x, denoised))
    return outputs


def toy_model(x, s):
    """A deterministic stand-in for a UNet whose output depends on the input and the timestep it sees."""
    return torch.tanh(0.7 * x + 0.002 * s) + 0.1 * torch.cos(x * (1 + s / 500))


@pytest.mark.parametrize("shift", [250, 500])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_timesteps_match_nitrofusion_table(shift, steps):
    s = TimestepShiftLCMScheduler(shift=shift)
    s.set_timesteps(steps)
    lcm, model = TABLE[steps][0], TABLE[steps][SHIFT_COLUMN[shift]]
    assert s.lcm_timesteps.tolist() == lcm
    assert s.model_timesteps.tolist() == model
    assert s.timesteps.tolist() == model  # default timesteps_mode="model": what a diffusers pipeline feeds the UNet
    assert s.lcm_timesteps.dtype == s.model_timesteps.dtype == torch.long
    m = TimestepShiftLCMScheduler(shift=shift, timesteps_mode="lcm")
    m.set_timesteps(steps)
    assert m.timesteps.tolist() == lcm


@pytest.mark.parametrize("shift", [250, 500, 333.3, 1, 1000])
@pytest.mark.parametrize("steps", [3, 5, 8])
def test_timesteps_rule_for_other_step_counts(shift, steps):
    s = TimestepShiftLCMScheduler(shift=shift)
    s.set_timesteps(steps)
    lcm = [999 - math.floor(i * 1000 / steps) for i in range(steps)]
    assert s.lcm_timesteps.tolist() == lcm
    # floor(t * shift / 1000), with a tiny guard against float error at exact integers
    assert s.model_timesteps.tolist() == [math.floor(t * shift / 1000 + 1e-9) for t in lcm]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("shift", [250, 500])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_steps_match_independent_computation(prediction_type, shift, steps):
    s = TimestepShiftLCMScheduler(shift=shift, prediction_type=prediction_type)
    s.set_timesteps(steps)
    lcm = [999 - math.floor(i * 1000 / steps) for i in range(steps)]
    model_t = [math.floor(t * shift / 1000) for t in lcm]
    x_T = torch.randn(2, 4, 9, 7)
    expected = reference_run(toy_model, x_T, lcm, model_t, prediction_type, noise_seed=1234)

    g = torch.Generator().manual_seed(1234)
    x = x_T.clone()
    for i, t in enumerate(s.timesteps):
        out = s.step(toy_model(x, model_t[i]), t, x, generator=g)
        exp_x, exp_d = expected[i]
        scale = max(exp_x.abs().max().item(), 1.0)
        torch.testing.assert_close(out.denoised.double(), exp_d, rtol=0, atol=3e-5 * max(exp_d.abs().max(), 1.0))
        torch.testing.assert_close(out.prev_sample.double(), exp_x, rtol=0, atol=3e-5 * scale)
        assert out.prev_sample.dtype == x.dtype
        x = out.prev_sample
    torch.testing.assert_close(x, out.denoised, rtol=0, atol=0)  # last step: prev_sample is the denoised sample


def test_matches_official_nitrofusion_demo_scheduler():
    """The NitroFusion demo's scheduler: an LCMScheduler whose .timesteps are the shifted ones, stepping with the
    original timesteps swapped in (reconstructed here); same schedule with original_inference_steps=1000."""
    from diffusers import LCMScheduler

    class DemoScheduler(LCMScheduler):
        def __init__(self, *args, shifted_timestep=250, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_to_config(shifted_timestep=shifted_timestep)

        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            self.origin_timesteps = self.timesteps.clone()
            self.shifted_timesteps = (self.timesteps * self.config.shifted_timestep
                                      / self.config.num_train_timesteps).long()
            self.timesteps = self.shifted_timesteps

        def step(self, model_output, timestep, sample, generator=None, return_dict=True):
            if self.step_index is None:
                self._init_step_index(timestep)
            self.timesteps = self.origin_timesteps
            output = super().step(model_output, timestep, sample, generator, return_dict)
            self.timesteps = self.shifted_timesteps
            return output

    for shift in (250, 500):
        for steps in (1, 2, 4):
            demo = DemoScheduler(beta_schedule="scaled_linear", original_inference_steps=1000, shifted_timestep=shift)
            ours = TimestepShiftLCMScheduler(shift=shift, timesteps_mode="model")
            demo.set_timesteps(steps)
            ours.set_timesteps(steps)
            assert demo.timesteps.tolist() == ours.timesteps.tolist()
            x_a = x_b = torch.randn(1, 4, 8, 8)
            g_a, g_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
            for t in ours.timesteps:
                eps = toy_model(x_a, int(t))
                x_a = demo.step(eps, t, x_a, generator=g_a).prev_sample
                x_b = ours.step(eps, t, x_b, generator=g_b).prev_sample
            torch.testing.assert_close(x_b, x_a, rtol=0, atol=1e-5)


def test_step_accepts_either_timestep_and_checks_it():
    s = TimestepShiftLCMScheduler(shift=250)
    s.set_timesteps(2)
    x = torch.randn(1, 4, 4, 4)
    a = s.step(toy_model(x, 249), 999, x, generator=torch.Generator().manual_seed(0))  # LCM timestep
    s.set_timesteps(2)
    b = s.step(toy_model(x, 249), 249, x, generator=torch.Generator().manual_seed(0))  # model timestep
    torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match="step 1 expects timestep 499"):
        s.step(x, 999, x)
    s.step(x, torch.tensor(499), x)
    with pytest.raises(ValueError, match="all 2 steps"):
        s.step(x, 499, x)
    fresh = TimestepShiftLCMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        fresh.step(x, 999, x)
    fresh.set_timesteps(4)
    with pytest.raises(ValueError, match="not in this schedule"):
        fresh.step(x, 500, x)
    # starting mid-schedule by timestep (as diffusers schedulers do without set_begin_index)
    out = fresh.step(toy_model(x, 124), 499, x, generator=torch.Generator().manual_seed(0))
    assert fresh.step_index == 3 and out.prev_sample.shape == x.shape


def test_same_generator_same_result_and_dtype():
    s = TimestepShiftLCMScheduler()
    x = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    fn = lambda x, t: toy_model(x.float(), int(t[0])).to(x.dtype)  # noqa: E731
    a = sample(fn, s, x, 4, torch.Generator().manual_seed(3))
    b = sample(fn, s, x, 4, torch.Generator().manual_seed(3))
    c = sample(fn, s, x, 4, torch.Generator().manual_seed(4))
    assert a.dtype == torch.bfloat16
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_helper_feeds_model_timesteps():
    s = TimestepShiftLCMScheduler(shift=500)
    seen = []

    def fn(x, t):
        seen.append(t.tolist())
        return toy_model(x, int(t[0]))

    x_T = torch.randn(3, 1, 5, 5)
    out = sample(fn, s, x_T, 4, torch.Generator().manual_seed(9))
    assert seen == [[499] * 3, [374] * 3, [249] * 3, [124] * 3]
    expected = reference_run(toy_model, x_T, [999, 749, 499, 249], [499, 374, 249, 124], "epsilon", 9)[-1][1]
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=3e-5 * max(expected.abs().max(), 1.0))


def test_save_load_round_trip(tmp_path):
    s = TimestepShiftLCMScheduler(shift=500, prediction_type="v_prediction", timesteps_mode="model")
    s.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    loaded = TimestepShiftLCMScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(s.config)
    assert loaded.config.shift == 500 and loaded.config.timesteps_mode == "model"
    for sched in (s, loaded):
        sched.set_timesteps(4)
    assert loaded.timesteps.tolist() == s.timesteps.tolist() == [499, 374, 249, 124]
    x = torch.randn(1, 4, 6, 6)
    a = s.step(toy_model(x, 499), 499, x, generator=torch.Generator().manual_seed(1)).prev_sample
    b = loaded.step(toy_model(x, 499), 499, x, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.equal(a, b)


def test_from_base_model_scheduler_config():
    """load_pipeline builds ours from the base model's scheduler config (SDXL ships EulerDiscreteScheduler)."""
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler(beta_start=0.001, beta_end=0.02, beta_schedule="scaled_linear",
                                   prediction_type="v_prediction", steps_offset=1, timestep_spacing="leading")
    s = TimestepShiftLCMScheduler.from_config(euler.config, shift=500)
    assert (s.config.beta_start, s.config.beta_end, s.config.prediction_type) == (0.001, 0.02, "v_prediction")
    assert s.config.shift == 500
    torch.testing.assert_close(s.alphas_cumprod, euler.alphas_cumprod)


def test_add_noise():
    s = TimestepShiftLCMScheduler()
    acp = reference_alphas_cumprod()
    x0, noise = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    t = torch.tensor([999, 500, 3])
    out = s.add_noise(x0, noise, t)
    expected = torch.stack([math.sqrt(acp[k]) * x0[i].double() + math.sqrt(1 - acp[k]) * noise[i].double()
                            for i, k in enumerate(t.tolist())])
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    one = s.add_noise(x0, noise, 249)
    torch.testing.assert_close(one.double(), math.sqrt(acp[249]) * x0.double() + math.sqrt(1 - acp[249]) * noise.double(),
                               rtol=0, atol=1e-5)
    assert s.add_noise(x0.half(), noise.half(), 10).dtype == torch.float16
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        s.add_noise(x0, noise, 1000)
    with pytest.raises(ValueError, match="one per sample"):
        s.add_noise(x0, noise, torch.tensor([1, 2]))


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, True, "4", None])
def test_bad_step_counts(steps):
    s = TimestepShiftLCMScheduler()
    with pytest.raises(ValueError):
        s.set_timesteps(steps)


def test_custom_timesteps():
    s = TimestepShiftLCMScheduler(shift=250)
    s.set_timesteps(timesteps=[999, 399])
    assert s.lcm_timesteps.tolist() == [999, 399] and s.model_timesteps.tolist() == [249, 99]
    for bad in ([399, 999], [999, 999], [1000], [], [999.5]):
        with pytest.raises(ValueError, match="strictly decreasing"):
            s.set_timesteps(timesteps=bad)
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps(2, timesteps=[999, 499])


@pytest.mark.parametrize("shift", [0, -5, 1000.5, 1001, float("nan"), float("inf"), True, "250", None])
def test_bad_shift(shift):
    with pytest.raises(ValueError, match="shift"):
        TimestepShiftLCMScheduler(shift=shift)


def test_bad_config_values():
    with pytest.raises(ValueError, match="prediction_type"):
        TimestepShiftLCMScheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="timesteps_mode"):
        TimestepShiftLCMScheduler(timesteps_mode="shifted")
    with pytest.raises(ValueError, match="beta_schedule"):
        TimestepShiftLCMScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="trained_betas"):
        TimestepShiftLCMScheduler(trained_betas=[0.1, 0.2])


def test_zero_terminal_snr():
    s = TimestepShiftLCMScheduler(rescale_betas_zero_snr=True, shift=1000)
    assert s.alphas_cumprod[-1] == 0
    with pytest.raises(ValueError, match="zero terminal SNR"):
        s.set_timesteps(1)  # the model would see t=999 where epsilon cannot give x0
    v = TimestepShiftLCMScheduler(rescale_betas_zero_snr=True, shift=1000, prediction_type="v_prediction")
    v.set_timesteps(1)
    x = torch.randn(1, 4, 4, 4)
    assert torch.isfinite(v.step(x, 999, x).prev_sample).all()


def test_default_is_a_drop_in_for_a_diffusers_loop():
    """The diffusers idiom -- from_config(base scheduler config, shift=...) then `for t in .timesteps:
    unet(x, t); step(out, t, x)` -- feeds the model the SHIFTED timesteps and gives nitro.sampling.sample's result."""
    from diffusers import DDIMScheduler

    from nitrokernels.nitro.sampling import sample

    base = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s = TimestepShiftLCMScheduler.from_config(base.config, shift=250)
    x_T = torch.randn(2, 4, 9, 7)
    seen = []

    def model(x, t):
        seen.append(int(t))
        return toy_model(x, int(t))

    s.set_timesteps(4)
    x, g = x_T.clone(), torch.Generator().manual_seed(7)
    for t in s.timesteps:
        x = s.step(model(x, t), t, x, generator=g).prev_sample
    assert seen == [249, 187, 124, 62]
    expected = sample(lambda x, t: toy_model(x, int(t[0])), TimestepShiftLCMScheduler(shift=250), x_T, 4,
                      torch.Generator().manual_seed(7))
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
