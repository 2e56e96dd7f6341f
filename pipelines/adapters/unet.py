"""Stable Diffusion / SDXL UNets (`UNet2DConditionModel`): step-level policies on the whole UNet."""

from __future__ import annotations

import torch

from dcache.pipelines.adapters.base import Adapter, get_arg


class UNetAdapter(Adapter):
    def model_probe(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """The timestep embedding, computed the way the UNet computes it (cheap: two linears)."""
        sample = get_arg(model, "sample", args, kwargs)
        t = get_arg(model, "timestep", args, kwargs)
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=sample.device)
        t = t.reshape(-1).expand(sample.shape[0]).to(sample.device)
        emb = model.time_proj(t).to(dtype=sample.dtype)
        return model.time_embedding(emb)


def make() -> Adapter:
    return UNetAdapter(
        family="unet",
        model_classes=("UNet2DConditionModel",),
        block_lists=(),
        has_blocks=False,
    )
