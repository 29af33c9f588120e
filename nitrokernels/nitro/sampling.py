"""The 1-4-step NitroFusion sampling loop, shared by the digits demo and anything else that holds a bare UNet.

    x0 = sample(lambda x, t: unet(x, t, encoder_hidden_states=c).sample, scheduler, noise, steps=1, generator=g)

`unet_call(latents, model_t)` gets the current latents and the SHIFTED timestep the model sees (an int64 tensor
[B] on the latents' device) and returns the model output (epsilon / v / x0, per the scheduler's
`prediction_type`). The scheduler re-noises between steps at the original LCM timesteps with fresh noise from
`generator` (see nitrokernels.nitro.scheduler). A diffusers output object (`.sample`) or tuple is accepted too. The diffusers pipelines of nitrokernels.nitro.pipeline run the
same scheduler through diffusers' own loop.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Union

import torch

if TYPE_CHECKING:  # (the scheduler module imports diffusers)
    from nitrokernels.nitro.scheduler import TimestepShiftLCMScheduler

__all__ = ["sample"]


def sample(unet_call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler: "TimestepShiftLCMScheduler",
           latents: torch.Tensor,
           steps: int, generator: Union[torch.Generator, List[torch.Generator], None] = None) -> torch.Tensor:
    """Run `steps` steps of `scheduler` (a TimestepShiftLCMScheduler) from the noise `latents` -> the final x0.

    `latents` is the starting noise x_T (standard normal: the scheduler's init_noise_sigma is 1). Returns the
    last step's denoised sample, in the latents' dtype. Calls `scheduler.set_timesteps(steps)` itself.
    """
    scheduler.set_timesteps(steps, device=latents.device)
    batch = latents.shape[0]
    x = latents
    denoised = latents
    for t, model_t in zip(scheduler.lcm_timesteps.tolist(), scheduler.model_timesteps.tolist()):
        t_model = torch.full((batch,), model_t, dtype=torch.long, device=latents.device)
        output = unet_call(x, t_model)
        if not isinstance(output, torch.Tensor):  # a diffusers output object or a (sample,) tuple
            output = output.sample if hasattr(output, "sample") else output[0]
        if output.shape != x.shape:
            raise ValueError(f"sample: unet_call returned shape {tuple(output.shape)} for latents of shape "
                             f"{tuple(x.shape)}")
        x, denoised = scheduler.step(output, t, x, generator=generator, return_dict=False)
    return denoised


def sample_one_to_four(unet_call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       scheduler: "TimestepShiftLCMScheduler",
                       latents: torch.Tensor, steps: int,
                       generator: Union[torch.Generator, List[torch.Generator], None] = None) -> torch.Tensor:
    """Deprecated alias of `sample` (an early name of it); warns and calls sample."""
    import warnings

    warnings.warn("nitrokernels.nitro.sample_one_to_four is deprecated: use nitrokernels.nitro.sample (the same "
                  "function)", DeprecationWarning, stacklevel=2)
    return sample(unet_call, scheduler, latents, steps, generator)
