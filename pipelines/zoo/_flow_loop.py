"""The loop state and denoising loop the embedded Flux-based pipelines share (digits, scenes).

Euler flow matching with FluxPipeline-style "true CFG": the conditional call inside
``transformer.cache_context("cond")``, the unconditional one inside ``cache_context("uncond")``,
so diffusers' cache hooks keep one state per branch.
"""
from __future__ import annotations

from typing import Any

import torch


class FlowLoopMixin:
    """The read-only loop attributes diffusers' callbacks and cache hooks look for
    (``current_timestep`` for PAB/FasterCache, ``num_timesteps``, ``interrupt``, ...)."""

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt


def flow_cfg_loop(pipe: Any, latents: torch.Tensor, num_inference_steps: int, device: Any, dtype: torch.dtype,
                  cond: tuple, uncond: tuple | None, img_ids: torch.Tensor, txt_ids: torch.Tensor,
                  generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Run ``pipe``'s scheduler over ``latents``; ``cond``/``uncond`` are (tokens, pooled) pairs.

    ``generator`` goes to ``scheduler.step`` too: a stochastic scheduler
    (``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``) draws its fresh noise from it,
    so seeded runs repeat and a batch equals its images generated one by one; Euler ignores it.

    ``pipe`` provides ``scheduler``, ``transformer``, ``_velocity``, ``_guidance_scale`` and the
    usual diffusers loop attributes (``interrupt``, ``_current_timestep``, ``_num_timesteps``).
    """
    batch = latents.shape[0]
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = pipe.scheduler.timesteps
    pipe._num_timesteps = len(timesteps)
    with pipe.progress_bar(total=num_inference_steps) as progress_bar:
        for t in timesteps:
            if pipe.interrupt:
                continue
            pipe._current_timestep = t
            # The transformer multiplies by 1000 itself; the scheduler's timesteps are sigma * 1000.
            timestep = t.expand(batch).to(dtype) / 1000
            with pipe.transformer.cache_context("cond"):
                velocity = pipe._velocity(latents, timestep, *cond, img_ids, txt_ids)
            if uncond is not None:
                with pipe.transformer.cache_context("uncond"):
                    velocity_u = pipe._velocity(latents, timestep, *uncond, img_ids, txt_ids)
                velocity = velocity_u + pipe._guidance_scale * (velocity - velocity_u)
            latents = pipe.scheduler.step(velocity, t, latents, generator=generator, return_dict=False)[0]
            progress_bar.update()
    pipe._current_timestep = None
    return latents
