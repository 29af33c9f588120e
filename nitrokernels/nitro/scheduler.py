"""The timestep-shift LCM scheduler NitroFusion samples with (1-4 steps from the same weights).

Schedule (see ../shared/NITROFUSION.md, "Inference"), with T = num_train_timesteps (1000):

* LCM timesteps for n steps, evenly spaced from the end of the T train steps:
      t_i = T - 1 - floor(i * T / n),   i = 0 .. n-1
  (n=1: 999; n=2: 999, 499; n=4: 999, 749, 499, 249; n=3: 999, 666, 333). This is diffusers' LCMScheduler
  with `original_inference_steps = T`.
* What the UNet sees (`model_timesteps`):  s_i = floor(t_i * shift / T)   (shift 250: 249, 187, 124, 62).
* Step i, with a = alphas_cumprod[s_i] (the SHIFTED t) and the model output m:
      epsilon:       x0 = (x - sqrt(1 - a) * m) / sqrt(a)
      v_prediction:  x0 = sqrt(a) * x - sqrt(1 - a) * m
      sample:        x0 = m
      denoised = c_out(s_i) * x0 + c_skip(s_i) * x      (LCM boundary condition, below)
  then, unless i is the last step, the sample is re-noised to the ORIGINAL next LCM timestep with fresh noise
  from the generator:  x_next = sqrt(a') * denoised + sqrt(1 - a') * z,  a' = alphas_cumprod[t_{i+1}].
  The last step returns prev_sample = denoised.
* Boundary condition: we follow LCM (and the NitroFusion demo scheduler, an LCMScheduler subclass): with
  sigma_data = 0.5 and u = s_i * timestep_scaling (10),  c_skip = sigma_data^2 / (u^2 + sigma_data^2) and
  c_out = u / sqrt(u^2 + sigma_data^2), evaluated at the shifted timestep. At the shifted timesteps of the table
  (>= 62) c_skip < 1e-6, so denoised is x0 to within 1e-6 relative; it only matters for tiny shifts.
* The first sample is pure Gaussian noise (init_noise_sigma = 1), as in LCM.
* Beta schedules as in diffusers (linear, scaled_linear, squaredcos_cap_v2, trained_betas, optional zero-terminal-SNR
  rescaling), so `from_config(base_pipeline.scheduler.config, shift=...)` keeps the base model's noise schedule.

`.timesteps` holds what the UNet must see, the shifted timesteps (`timesteps_mode="model"`, the default), because a
diffusers pipeline -- or any loop written the diffusers way -- feeds `scheduler.timesteps` straight to the UNet:
`pipe.scheduler = TimestepShiftLCMScheduler.from_config(pipe.scheduler.config, shift=250)` is then a correct
drop-in (what the official NitroFusion demo does). `timesteps_mode="lcm"` exposes the original LCM timesteps there
instead, for code that maps them to the model itself. `.lcm_timesteps` and `.model_timesteps` are always both
available, and `step()` accepts either timestep of the current step.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["TimestepShiftLCMScheduler", "TimestepShiftLCMSchedulerOutput", "lcm_timesteps", "shifted_timestep"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEPS_MODES = ("lcm", "model")
SIGMA_DATA = 0.5


@dataclass
class TimestepShiftLCMSchedulerOutput(BaseOutput):
    """prev_sample: the input of the next step (re-noised), or the final sample after the last step.
    denoised: this step's estimate of the clean sample (after the boundary condition)."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


def lcm_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> List[int]:
    """The original LCM timesteps for `num_inference_steps`, evenly spaced from the end of the train steps."""
    n, total = num_inference_steps, num_train_timesteps
    return [total - 1 - (i * total) // n for i in range(n)]


def shifted_timestep(t: int, shift: Union[int, float], num_train_timesteps: int = 1000) -> int:
    """floor(t * shift / T), computed exactly (no float rounding at integer boundaries)."""
    return math.floor(Fraction(int(t)) * Fraction(shift) / num_train_timesteps)


def _check_shift(shift, num_train_timesteps: int):
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not math.isfinite(shift) \
            or not 0 < shift <= num_train_timesteps:
        raise ValueError(f"shift must be a number in (0, {num_train_timesteps}] (NitroSD uses 250 for Realism, 500 "
                         f"for Vibrant), got {shift!r}")


def _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas) -> torch.Tensor:
    # Same tables (float32) as diffusers' DDPM/LCM schedulers, so alphas_cumprod matches theirs.
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
        if betas.ndim != 1 or len(betas) != num_train_timesteps:
            raise ValueError(f"trained_betas must have num_train_timesteps={num_train_timesteps} entries, "
                             f"got shape {tuple(betas.shape)}")
        return betas
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps),
                                 0.999) for i in range(num_train_timesteps)], dtype=torch.float32)
    raise ValueError(f"beta_schedule {beta_schedule!r} is not supported: use 'linear', 'scaled_linear', "
                     "'squaredcos_cap_v2' or trained_betas")


class TimestepShiftLCMScheduler(SchedulerMixin, ConfigMixin):
    """LCM scheduler with NitroFusion's timestep shift (see the module docstring for the exact rules).

    >>> s = TimestepShiftLCMScheduler(shift=250); s.set_timesteps(4)
    >>> s.lcm_timesteps.tolist(), s.model_timesteps.tolist()
    ([999, 749, 499, 249], [249, 187, 124, 62])
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Optional[Sequence[float]] = None,
        shift: Union[int, float] = 250,
        prediction_type: str = "epsilon",
        timestep_scaling: float = 10.0,
        timesteps_mode: str = "model",
        rescale_betas_zero_snr: bool = False,
    ):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        _check_shift(shift, num_train_timesteps)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if timesteps_mode not in TIMESTEPS_MODES:
            raise ValueError(f"timesteps_mode must be one of {TIMESTEPS_MODES} ('lcm': .timesteps are the original "
                             "LCM timesteps; 'model': the shifted ones, for diffusers pipelines), "
                             f"got {timesteps_mode!r}")
        if isinstance(timestep_scaling, bool) or not isinstance(timestep_scaling, numbers.Real) \
                or not math.isfinite(timestep_scaling) or not timestep_scaling > 0:
            raise ValueError(f"timestep_scaling must be > 0, got {timestep_scaling!r}")

        self.betas = _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._alphas_cumprod_list = self.alphas_cumprod.tolist()  # python floats: step() never syncs a device
        self.init_noise_sigma = 1.0

        self.num_inference_steps: Optional[int] = None
        self.lcm_timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self.model_timesteps = torch.tensor([shifted_timestep(t, shift, num_train_timesteps)
                                             for t in self.lcm_timesteps.tolist()], dtype=torch.long)
        self.timesteps = self._exposed(self.lcm_timesteps, self.model_timesteps)
        self._lcm_list: List[int] = []
        self._model_list: List[int] = []
        self._coefficients: List[Tuple[float, float, float, float]] = []
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None

    # ------------------------------------------------------------------ schedule
    def shifted_timestep(self, t: int) -> int:
        """The timestep the UNet sees for an original LCM timestep t: floor(t * shift / T)."""
        return shifted_timestep(t, self.config.shift, self.config.num_train_timesteps)

    def boundary_condition_scalings(self, model_t: int) -> Tuple[float, float]:
        """LCM's (c_skip, c_out) at the shifted timestep `model_t`."""
        u = model_t * self.config.timestep_scaling
        return SIGMA_DATA**2 / (u**2 + SIGMA_DATA**2), u / (u**2 + SIGMA_DATA**2) ** 0.5

    def _exposed(self, lcm: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
        return model if self.config.timesteps_mode == "model" else lcm

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      timesteps: Optional[Sequence[int]] = None):
        """Set the schedule for `num_inference_steps` (1..T; NitroSD is trained for 1-4), or for custom original
        timesteps (strictly decreasing integers in [0, T-1])."""
        total = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            if isinstance(timesteps, torch.Tensor):
                timesteps = timesteps.tolist()
            lcm = [int(t) for t in timesteps]
            if not lcm or any(t != float(u) for t, u in zip(lcm, timesteps)) or any(not 0 <= t < total for t in lcm) \
                    or any(a <= b for a, b in zip(lcm, lcm[1:])):
                raise ValueError(f"custom timesteps must be strictly decreasing integers in [0, {total - 1}], "
                                 f"got {list(timesteps)}")
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) \
                    or not 1 <= num_inference_steps <= total:
                raise ValueError(f"num_inference_steps must be an integer in [1, {total}] (NitroSD: 1-4), "
                                 f"got {num_inference_steps!r}")
            lcm = lcm_timesteps(int(num_inference_steps), total)
        model = [self.shifted_timestep(t) for t in lcm]
        acp = self._alphas_cumprod_list
        if self.config.prediction_type == "epsilon" and any(acp[s] <= 0 for s in model):
            raise ValueError(f"alphas_cumprod is 0 at a model timestep of {model} (zero terminal SNR): epsilon "
                             "prediction cannot recover x0 there; lower the shift or use v_prediction")
        coefficients = []
        for i, (t, s) in enumerate(zip(lcm, model)):
            c_skip, c_out = self.boundary_condition_scalings(s)
            a_next = acp[lcm[i + 1]] if i + 1 < len(lcm) else None
            coefficients.append((acp[s], c_skip, c_out, a_next))

        self.num_inference_steps = len(lcm)
        self._lcm_list, self._model_list, self._coefficients = lcm, model, coefficients
        self.lcm_timesteps = torch.tensor(lcm, dtype=torch.long, device=device)
        self.model_timesteps = torch.tensor(model, dtype=torch.long, device=device)
        self.timesteps = self._exposed(self.lcm_timesteps, self.model_timesteps)
        self._step_index = None
        self._begin_index = None

    # ------------------------------------------------------------------ diffusers scheduler protocol
    @property
    def step_index(self) -> Optional[int]:
        """Index of the next step in `timesteps` (None before the first step), as diffusers schedulers have."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """The first step's index when a pipeline sets one (set_begin_index), else None."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at step `begin_index` (diffusers' img2img pipelines call it)."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
        """The sample unchanged (LCM needs no input scaling; diffusers' pipelines call it)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @staticmethod
    def _as_int(timestep) -> Optional[int]:
        """The timestep as a python int, or None where reading it would sync a device (a GPU tensor)."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"step() takes one timestep for the whole batch, got shape {tuple(timestep.shape)}")
            return None if timestep.device.type != "cpu" else int(timestep.item())
        return int(timestep)

    def _init_step_index(self, timestep):
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        value = self._as_int(timestep)
        if value is None:  # a device tensor: one sync, only on the first step of a run without begin_index
            value = int(timestep.item())
        exposed, other = ((self._model_list, self._lcm_list) if self.config.timesteps_mode == "model"
                          else (self._lcm_list, self._model_list))
        found = [schedule.index(value) if value in schedule else None for schedule in (exposed, other)]
        if found[0] is not None and found[1] is not None and found[0] != found[1] and found[0] != 0:
            names = ("LCM", "model") if self.config.timesteps_mode == "lcm" else ("model", "LCM")
            raise ValueError(f"timestep {value} is ambiguous: it is step {found[0]}'s {names[0]} timestep and step "
                             f"{found[1]}'s {names[1]} timestep (LCM timesteps {self._lcm_list}, model timesteps "
                             f"{self._model_list}); pass step_index= to step() or call set_begin_index(i) first")
        for index in found:
            if index is not None:
                self._step_index = index
                return
        raise ValueError(f"timestep {value} is not in this schedule (LCM timesteps {self._lcm_list}, model "
                         f"timesteps {self._model_list}); call set_timesteps first")

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             generator: Union[torch.Generator, List[torch.Generator], None] = None, return_dict: bool = True,
             step_index: Optional[int] = None):
        """One NitroFusion/LCM step. `timestep` is the current step's LCM or model timestep (either is accepted).
        `step_index` (optional) says which step this is; needed only where a first timestep is ambiguous (a model
        timestep equal to another step's LCM timestep): without it, such a timestep is refused, except when it
        is the first exposed (`.timesteps[0]`) one.

        Returns TimestepShiftLCMSchedulerOutput(prev_sample, denoised), or the tuple (prev_sample, denoised).
        The arithmetic runs in float32; outputs have the sample's dtype. Fresh noise (float32, then cast) is drawn
        from `generator` for every step but the last.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if step_index is not None:
            if isinstance(step_index, bool) or not isinstance(step_index, numbers.Integral) \
                    or not 0 <= step_index < self.num_inference_steps:
                raise ValueError(f"step: step_index must be an int in [0, {self.num_inference_steps}), "
                                 f"got {step_index!r}")
            self._step_index = int(step_index)
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise ValueError(f"all {self.num_inference_steps} steps of this schedule are done; call set_timesteps "
                             "again to sample another batch")
        value = self._as_int(timestep)
        if value is not None and value not in (self._lcm_list[i], self._model_list[i]):
            raise ValueError(f"step {i} expects timestep {self._lcm_list[i]} (LCM) or {self._model_list[i]} (model), "
                             f"got {value}")

        alpha_next = self._coefficients[i][3]
        denoised = self.denoise(model_output, i, sample).float()
        if alpha_next is not None:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=torch.float32)
            prev_sample = alpha_next**0.5 * denoised + (1 - alpha_next) ** 0.5 * noise
        else:
            prev_sample = denoised
        self._step_index = i + 1
        prev_sample, denoised = prev_sample.to(sample.dtype), denoised.to(sample.dtype)
        if not return_dict:
            return prev_sample, denoised
        return TimestepShiftLCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def denoise(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """Step `step_index`'s clean estimate (x0 from the model output at the shifted timestep, then LCM's boundary
        condition), without re-noising or advancing the schedule: what a trainer differentiates through. float32."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before denoise()")
        if isinstance(step_index, bool) or not isinstance(step_index, numbers.Integral) \
                or not 0 <= step_index < self.num_inference_steps:
            raise ValueError(f"denoise: step_index must be an int in [0, {self.num_inference_steps}), got {step_index!r}")
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor) \
                or model_output.shape != sample.shape:
            raise ValueError(f"model_output and sample must be tensors of one shape (no broadcasting), got "
                             f"{tuple(getattr(model_output, 'shape', ()))} and {tuple(getattr(sample, 'shape', ()))}")
        alpha, c_skip, c_out, _ = self._coefficients[step_index]
        x = sample.float()
        out = model_output.float()
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (x - (1 - alpha) ** 0.5 * out) / alpha**0.5
        elif kind == "v_prediction":
            x0 = alpha**0.5 * x - (1 - alpha) ** 0.5 * out
        else:
            x0 = out
        return c_out * x0 + c_skip * x

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: Union[int, torch.Tensor]) -> torch.Tensor:
        """Forward diffusion to ORIGINAL (train-axis, unshifted) timesteps: sqrt(a_t) x0 + sqrt(1 - a_t) noise.

        `timesteps` is an int or a tensor with one entry per sample (or one for all). To noise a clean sample to
        the start of step i of the current schedule, pass `scheduler.lcm_timesteps[i]`.
        """
        timesteps = torch.as_tensor(timesteps, device=original_samples.device).long().flatten()
        total = self.config.num_train_timesteps
        if timesteps.device.type == "cpu" and ((timesteps < 0) | (timesteps >= total)).any():
            raise ValueError(f"add_noise timesteps must be in [0, {total - 1}], got {timesteps.tolist()}")
        if noise.shape != original_samples.shape:
            raise ValueError(f"add_noise: noise has shape {tuple(noise.shape)}, original_samples "
                             f"{tuple(original_samples.shape)}")
        if timesteps.numel() not in (1, original_samples.shape[0]):
            raise ValueError(f"add_noise needs one timestep or one per sample ({original_samples.shape[0]}), "
                             f"got {timesteps.numel()}")
        acp = self.alphas_cumprod.to(original_samples.device)[timesteps]
        acp = acp.view(-1, *([1] * (original_samples.ndim - 1)))
        noisy = acp.sqrt() * original_samples.float() + (1 - acp).sqrt() * noise.float()
        return noisy.to(original_samples.dtype)
