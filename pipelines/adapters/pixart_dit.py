"""PixArt-α/Σ and DiT: both are built from diffusers' `BasicTransformerBlock`."""

from __future__ import annotations

import torch

from dcache.pipelines.adapters.base import Adapter, BlockSpec, get_arg

_BASIC = BlockSpec(encoder=None, returns=("hidden",), sites=("attn1", "attn2", "ff"),
                   token_sites=(("attn1", "self"), ("attn2", "cross"), ("ff", "mlp")),
                   attention=(("attn1", "spatial"), ("attn2", "cross")))


class BasicBlockAdapter(Adapter):
    def teacache_probe(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden = get_arg(block, "hidden_states", args, kwargs)
        timestep = get_arg(block, "timestep", args, kwargs)
        if block.norm_type == "ada_norm_single":
            # PixArt feeds every block the same 6·D adaLN embedding: the timestep-embedding probe
            # TeaCache uses for Wan/CogVideoX.
            return timestep
        if block.norm_type == "ada_norm_zero":
            labels = get_arg(block, "class_labels", args, kwargs)
            return block.norm1(hidden, timestep, labels, hidden_dtype=hidden.dtype)[0]
        return block.norm1(hidden)


def make_pixart() -> Adapter:
    return BasicBlockAdapter(
        family="pixart",
        model_classes=("PixArtTransformer2DModel",),
        block_lists=("transformer_blocks",),
        block_specs={"BasicTransformerBlock": _BASIC},
    )


def make_dit() -> Adapter:
    return BasicBlockAdapter(
        family="dit",
        model_classes=("DiTTransformer2DModel",),
        block_lists=("transformer_blocks",),
        block_specs={"BasicTransformerBlock": _BASIC},
        batched_cfg_cond_half=0,  # DiTPipeline: cat([class_labels, class_null])
    )
