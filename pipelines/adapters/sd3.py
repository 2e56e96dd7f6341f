"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`, `JointTransformerBlock`)."""

from dcache.pipelines.adapters.base import Adapter, BlockSpec

_JOINT = BlockSpec(
    encoder="encoder_hidden_states", returns=("encoder", "hidden"), sites=("attn", "attn2", "ff", "ff_context"),
    # attn2 is SD3.5's second self-attention on the image stream (dual-attention blocks).
    token_sites=(("attn", "self"), ("attn2", "self"), ("ff", "mlp"), ("ff_context", "mlp")),
    # SD3.5's attn2 is a second self-attention over the image tokens, not cross-attention.
    attention=(("attn", "spatial"), ("attn2", "spatial")),
)


def make() -> Adapter:
    # No published TeaCache coefficients for SD3: `teacache` falls back to the raw distance unless calibrated.
    return Adapter(
        family="sd3",
        model_classes=("SD3Transformer2DModel",),
        block_lists=("transformer_blocks",),
        block_specs={"JointTransformerBlock": _JOINT},
    )
