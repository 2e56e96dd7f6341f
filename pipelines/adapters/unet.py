"""Stable Diffusion / SDXL UNets (`UNet2DConditionModel`): step-level policies on the whole UNet,
and the skip-branch structure DeepCache needs (which modules lie beneath a branch)."""

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

    # -- skip branches (DeepCache) -------------------------------------------------------------------
    # The UNet pairs down block i with up block L-1-i through its skip connections. Branch b is the
    # boundary between up blocks L-2-b and L-1-b: beneath it lie down blocks b+1.., the mid block
    # and up blocks ..L-2-b; the feature entering up block L-1-b is everything those compute.
    def skip_branches(self, model: torch.nn.Module) -> int:
        """How many branch ids the model has (one per down block)."""
        return len(model.down_blocks)

    def deep_modules(self, model: torch.nn.Module, branch: int) -> list[tuple[str, torch.nn.Module]]:
        """The modules beneath branch ``branch``, as (kind, module): kind is ``down`` (returns
        ``(hidden, skip tensors)``), ``mid`` or ``up`` (return one tensor)."""
        n = len(model.down_blocks)
        out: list[tuple[str, torch.nn.Module]] = [("down", m) for m in list(model.down_blocks)[branch + 1:]]
        if getattr(model, "mid_block", None) is not None:
            out.append(("mid", model.mid_block))
        out += [("up", m) for m in list(model.up_blocks)[: n - 1 - branch]]
        return out

    def branch_up_block(self, model: torch.nn.Module, branch: int) -> torch.nn.Module:
        """The up block whose ``hidden_states`` input is the deep feature of branch ``branch``."""
        return model.up_blocks[len(model.down_blocks) - 1 - branch]


def make() -> Adapter:
    return UNetAdapter(
        family="unet",
        model_classes=("UNet2DConditionModel",),
        block_lists=(),
        has_blocks=False,
    )
