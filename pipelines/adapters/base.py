"""What an adapter tells the engine about one model family.

Policies never see a model class; they see blocks, sites and steps. An adapter maps a diffusers
denoiser onto those: the ordered block chain, how each block class takes and returns its
streams, which child modules are the expensive sites (their output taken before the block
applies its freshly computed gates), the TeaCache probe, and known per-checkpoint coefficients.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class BlockSpec:
    """I/O and sites of one transformer block class.

    Attributes:
        encoder: argument name of the text stream, or None when the block returns only the image stream.
        returns: order of the returned streams, e.g. ``("encoder", "hidden")`` for Flux blocks.
        sites: children whose outputs module-level policies cache and forecast.
        feeders: children whose outputs flow only into a site (Flux single blocks: ``attn``,
            ``proj_mlp`` and ``act_mlp`` feed ``proj_out``); they are skipped together with that
            site and return an empty placeholder, so they must have no other consumer.
        token_sites: (child, kind) pairs that token-subset policies recompute on chosen tokens;
            kind is ``"self"`` (self/joint attention: recomputed or reused in full), ``"cross"``
            (cross-attention: per query token, text K/V in full), ``"mlp"`` (per token), or
            ``"follows:<child>"`` (per token, on the tokens that child chose in the same call).
    """

    hidden: str = "hidden_states"
    encoder: str | None = None
    returns: tuple[str, ...] = ("hidden",)
    sites: tuple[str, ...] = ()
    feeders: tuple[str, ...] = ()
    token_sites: tuple[tuple[str, str], ...] = ()
    attention: tuple[tuple[str, str], ...] = ()


@dataclass
class Adapter:
    """Base adapter; subclasses fill in the class attributes and override the probe if needed."""

    family: str = ""
    model_classes: tuple[str, ...] = ()
    block_lists: tuple[str, ...] = ()
    block_specs: dict[str, BlockSpec] = field(default_factory=dict)
    timestep_arg: str = "timestep"
    # Checkpoint name fragment -> TeaCache rescale coefficients (highest degree first).
    teacache_coefficients: dict[str, list[float]] = field(default_factory=dict)
    default_coefficients_key: str | None = None
    # Warm-up steps each coefficient set was fitted and published with (key as above); None: 1.
    teacache_warmup: dict[str, int] = field(default_factory=dict)
    has_blocks: bool = True
    # Batched CFG (one call, batch 2B): which half of the batch is the conditional pass.
    # diffusers' SD/PixArt/SD3/CogVideoX pipelines concatenate [negative, positive] (1); DiT's
    # pipeline concatenates [class_labels, class_null] (0).
    batched_cfg_cond_half: int = 1

    # -- blocks ------------------------------------------------------------------------------------
    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        out: list[torch.nn.Module] = []
        for name in self.block_lists:
            lst = getattr(model, name, None)
            if lst is not None:
                out.extend(lst)
        return out

    def spec(self, block: torch.nn.Module) -> BlockSpec:
        name = type(block).__name__
        if name not in self.block_specs:
            raise ValueError(
                f"{self.family} adapter has no spec for block class {name}; known: {sorted(self.block_specs)}"
            )
        return self.block_specs[name]

    def attention_kinds(self, blocks: list[torch.nn.Module]) -> set[str]:
        """The attention kinds present in ``blocks`` (see :attr:`BlockSpec.attention`)."""
        kinds = set()
        for block in blocks:
            for attr, kind in self.spec(block).attention:
                if isinstance(getattr(block, attr, None), torch.nn.Module):
                    kinds.add(kind)
        return kinds

    def guidance_distilled(self, model: torch.nn.Module) -> str | None:
        """Why the model has no true classifier-free guidance to cache, or None.

        A guidance-distilled model (FLUX.1-dev, HunyuanVideo) takes the guidance scale as an
        input embedding (``guidance_embeds``) and is run with one denoiser call per step.
        """
        if getattr(getattr(model, "config", None), "guidance_embeds", False):
            return (f"{type(model).__name__} is guidance-distilled (config.guidance_embeds=True): the guidance "
                    "scale is an input embedding, there is no unconditional branch to cache")
        return None

    def token_grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
        """(frames, height, width) of the image tokens of a token-sequence prediction (B, N, C), if known."""
        return None

    # -- arguments -----------------------------------------------------------------------------------
    def timestep(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> float:
        t = kwargs.get(self.timestep_arg)
        if t is None:
            t = get_arg(module, self.timestep_arg, args, kwargs)
        if t is None:
            raise ValueError(f"{self.family}: the denoiser was called without `{self.timestep_arg}`")
        if isinstance(t, torch.Tensor):
            # Per-token (Wan 2.2 expand_timesteps, LTX image-to-video) and per-sample timesteps:
            # conditioning tokens carry t = 0, so the first element says nothing about the step.
            return float(t.detach().max().item()) if t.numel() > 1 else float(t.detach().reshape(-1)[0].item())
        return float(t)

    def teacache_probe(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """Default probe: the first block's AdaLN-modulated input (TeaCache's indicator, arXiv 2411.19108)."""
        hidden = get_arg(block, "hidden_states", args, kwargs)
        temb = get_arg(block, "temb", args, kwargs)
        return block.norm1(hidden, emb=temb)[0]

    def teacache_warmup_for(self, model: torch.nn.Module) -> int | None:
        """The warm-up the matching coefficient set is paired with in its source, if it names one."""
        _, source = self.coefficients_for(model)
        for key, steps in self.teacache_warmup.items():
            if source.startswith(f"published coefficients for {key}"):
                return steps
        return None

    def coefficients_for(self, model: torch.nn.Module) -> tuple[list[float] | None, str]:
        """TeaCache coefficients for this checkpoint: (coefficients or None, where they came from)."""
        name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "").lower()
        for key, coeffs in self.teacache_coefficients.items():
            if key.lower() in name:
                return coeffs, f"published coefficients for {key}"
        if self.default_coefficients_key is not None:
            key = self.default_coefficients_key
            return self.teacache_coefficients[key], f"published coefficients for {key} (checkpoint not recognised)"
        return None, "no published coefficients for this family"


class TimestepEmbeddingProbeAdapter(Adapter):
    """TeaCache's probe is the timestep embedding the blocks receive as ``temb`` (Wan's e0,
    CogVideoX's emb), not a modulated input."""

    def teacache_probe(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        return get_arg(block, "temb", args, kwargs)


_SIGNATURES: dict[type, dict[str, int]] = {}


def get_arg(module: torch.nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
    """Value of forward argument ``name`` whether it was passed by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    cls = type(module)
    index = _SIGNATURES.get(cls)
    if index is None:
        params = list(inspect.signature(cls.forward).parameters)[1:]  # drop self
        index = {p: i for i, p in enumerate(params)}
        _SIGNATURES[cls] = index
    i = index.get(name)
    if i is not None and i < len(args):
        return args[i]
    return None
