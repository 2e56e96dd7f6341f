"""Wan 2.1 / 2.2 (`WanTransformer3DModel`)."""

from dcache.pipelines.adapters.base import Adapter, BlockSpec, TimestepEmbeddingProbeAdapter

_BLOCK = BlockSpec(encoder=None, returns=("hidden",), sites=("attn1", "attn2", "ffn"),
                   token_sites=(("attn1", "self"), ("attn2", "cross"), ("ffn", "mlp")),
                   attention=(("attn1", "spatial"), ("attn2", "cross")))


def make() -> Adapter:
    # Blocks receive the 6·D modulation vector e0 = time_projection(e) as ``temb``; TeaCache's
    # "ret-steps" coefficients are fitted on exactly this indicator.
    return TimestepEmbeddingProbeAdapter(
        family="wan",
        model_classes=("WanTransformer3DModel",),
        block_lists=("blocks",),
        block_specs={"WanTransformerBlock": _BLOCK},
        # TeaCache ret-steps (e0) coefficients, from ali-vilab/TeaCache teacache_generate.py.
        teacache_coefficients={
            "Wan2.1-I2V-14B-480P": [2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01],
            "Wan2.1-I2V-14B-720P": [8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02],
            "Wan2.1-T2V-14B": [-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01],
            "Wan2.1-T2V-1.3B": [-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02],
        },
        default_coefficients_key="Wan2.1-T2V-1.3B",
        # The ret-steps sets are used with the first 5 steps always computed (teacache_generate.py:
        # ret_steps = 5*2 calls with CFG); fewer warm-up steps than that is outside their fit.
        teacache_warmup={k: 5 for k in ("Wan2.1-I2V-14B-480P", "Wan2.1-I2V-14B-720P", "Wan2.1-T2V-14B",
                                        "Wan2.1-T2V-1.3B")},
    )
