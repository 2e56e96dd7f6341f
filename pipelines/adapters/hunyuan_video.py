"""HunyuanVideo (`HunyuanVideoTransformer3DModel`): double- then single-stream blocks, Flux-like."""

from dcache.pipelines.adapters.base import Adapter, BlockSpec

# Hunyuan blocks return (hidden, encoder) — the reverse of Flux.
_DOUBLE = BlockSpec(encoder="encoder_hidden_states", returns=("hidden", "encoder"), sites=("attn", "ff", "ff_context"))
_SINGLE = BlockSpec(
    encoder="encoder_hidden_states", returns=("hidden", "encoder"), sites=("proj_out",), feeders=("attn", "proj_mlp", "act_mlp")
)


def make() -> Adapter:
    return Adapter(
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
