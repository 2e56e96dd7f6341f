"""HunyuanVideo (`HunyuanVideoTransformer3DModel`): double- then single-stream blocks, Flux-like."""

import torch

from dcache.pipelines.adapters.base import Adapter, BlockSpec, get_arg

# Hunyuan blocks return (hidden, encoder) — the reverse of Flux.
_DOUBLE = BlockSpec(encoder="encoder_hidden_states", returns=("hidden", "encoder"), sites=("attn", "ff", "ff_context"),
                    attention=(("attn", "spatial"),))
_SINGLE = BlockSpec(
    encoder="encoder_hidden_states", returns=("hidden", "encoder"), sites=("proj_out",), feeders=("attn", "proj_mlp", "act_mlp"),
    attention=(("attn", "spatial"),),
)


class HunyuanVideoAdapter(Adapter):
    def teacache_probe(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        # Image-to-video with token replace: the first frame's tokens get their own modulation,
        # and the block's norm1 takes (hidden, temb, token_replace_emb, first-frame tokens).
        if type(block).__name__.startswith("HunyuanVideoTokenReplace"):
            hidden = get_arg(block, "hidden_states", args, kwargs)
            temb = get_arg(block, "temb", args, kwargs)
            tr_emb = get_arg(block, "token_replace_emb", args, kwargs)
            n = get_arg(block, "num_tokens", args, kwargs)
            return block.norm1(hidden, temb, tr_emb, n)[0]
        return super().teacache_probe(block, args, kwargs)


def make() -> Adapter:
    return HunyuanVideoAdapter(
        family="hunyuan_video",
        model_classes=("HunyuanVideoTransformer3DModel",),
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        block_specs={
            "HunyuanVideoTransformerBlock": _DOUBLE,
            "HunyuanVideoSingleTransformerBlock": _SINGLE,
            "HunyuanVideoTokenReplaceTransformerBlock": _DOUBLE,
            "HunyuanVideoTokenReplaceSingleTransformerBlock": _SINGLE,
        },
        teacache_coefficients={
            "HunyuanVideo": [7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02],
        },
        default_coefficients_key="HunyuanVideo",
    )
