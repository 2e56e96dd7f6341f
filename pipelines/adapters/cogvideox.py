"""CogVideoX (`CogVideoXTransformer3DModel`)."""

from dcache.pipelines.adapters.base import Adapter, BlockSpec, TimestepEmbeddingProbeAdapter

_BLOCK = BlockSpec(encoder="encoder_hidden_states", returns=("hidden", "encoder"), sites=("attn1", "ff"),
                   attention=(("attn1", "spatial"),))


def make() -> Adapter:
    return TimestepEmbeddingProbeAdapter(
        family="cogvideox",
        model_classes=("CogVideoXTransformer3DModel",),
        block_lists=("transformer_blocks",),
        block_specs={"CogVideoXBlock": _BLOCK},
        teacache_coefficients={
            "CogVideoX1.5-5B-I2V": [1.22842302e02, -1.04088754e02, 2.62981677e01, -3.06009921e-01, 3.71213220e-02],
            "CogVideoX1.5-5B": [2.50210439e02, -1.65061612e02, 3.57804877e01, -7.81551492e-01, 3.58559703e-02],
            "CogVideoX-2b": [-3.10658903e01, 2.54732368e01, -5.92380459e00, 1.75769064e00, -3.61568434e-03],
            "CogVideoX-5b": [-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02],
        },
        default_coefficients_key="CogVideoX-5b",
    )
