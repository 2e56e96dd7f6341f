"""Qwen-Image (`QwenImageTransformer2DModel`)."""

from __future__ import annotations

import torch

from dcache.pipelines.adapters.base import Adapter, BlockSpec, get_arg

_BLOCK = BlockSpec(
    encoder="encoder_hidden_states", returns=("encoder", "hidden"), sites=("attn", "img_mlp", "txt_mlp"),
    attention=(("attn", "spatial"),),
)


class QwenImageAdapter(Adapter):
    def teacache_probe(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden = get_arg(block, "hidden_states", args, kwargs)
        temb = get_arg(block, "temb", args, kwargs)
        mod1 = block.img_mod(temb).chunk(2, dim=-1)[0]
        return block._modulate(block.img_norm1(hidden), mod1)[0]

    def token_grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
        # img_shapes: one [(frames, h, w), ...] list per sample; a single image per sample here.
        shapes = get_arg(model, "img_shapes", args, kwargs)
        try:
            first = shapes[0][0] if isinstance(shapes[0], (list, tuple)) and isinstance(shapes[0][0], (list, tuple)) \
                else shapes[0]
            f, h, w = (int(x) for x in first)
        except (TypeError, IndexError, ValueError):
            return None
        return f, h, w


def make() -> Adapter:
    return QwenImageAdapter(
        family="qwenimage",
        model_classes=("QwenImageTransformer2DModel",),
        block_lists=("transformer_blocks",),
        block_specs={"QwenImageTransformerBlock": _BLOCK},
    )
