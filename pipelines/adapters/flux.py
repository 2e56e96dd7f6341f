"""FLUX.1 (`FluxTransformer2DModel`): 19 double-stream + 38 single-stream blocks in the full model."""

import torch

from dcache.pipelines.adapters.base import Adapter, BlockSpec, get_arg

# Both Flux block kinds take (hidden, encoder) and return (encoder, hidden) in diffusers >= 0.35.
_DOUBLE = BlockSpec(encoder="encoder_hidden_states", returns=("encoder", "hidden"), sites=("attn", "ff", "ff_context"),
                    token_sites=(("attn", "self"), ("ff", "mlp"), ("ff_context", "mlp")),
                    attention=(("attn", "spatial"),))
# Single blocks fuse attention and MLP in `proj_out`; TaylorSeer caches that pre-gate output
# (arXiv 2503.06923 code: `total = linear2(cat(attn, mlp))`), so attn/proj_mlp only feed it.
_SINGLE = BlockSpec(
    encoder="encoder_hidden_states", returns=("encoder", "hidden"), sites=("proj_out",), feeders=("attn", "proj_mlp", "act_mlp"),
    # Token subsets: proj_mlp picks the tokens, proj_out runs on the same ones (its input is
    # cat(attn, act(proj_mlp)), fresh in the MLP half exactly there); act_mlp is elementwise.
    token_sites=(("proj_mlp", "mlp"), ("attn", "self"), ("proj_out", "follows:proj_mlp")),
    attention=(("attn", "spatial"),),
)


class FluxAdapter(Adapter):
    def token_grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
        # Flux packs image tokens in raster order; img_ids carry (0, row, col) per token.
        ids = get_arg(model, "img_ids", args, kwargs)
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[1] < 3:
            return None
        rows, cols = ids[:, 1].long(), ids[:, 2].long()
        h, w = int(rows.max()) + 1, int(cols.max()) + 1
        if h * w != ids.shape[0] or not torch.equal(rows * w + cols, torch.arange(ids.shape[0], device=ids.device)):
            return None
        return 1, h, w


def make() -> Adapter:
    return FluxAdapter(
        family="flux",
        model_classes=("FluxTransformer2DModel",),
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        block_specs={"FluxTransformerBlock": _DOUBLE, "FluxSingleTransformerBlock": _SINGLE},
        # TeaCache rescale polynomials (ali-vilab/TeaCache; ComfyUI-TeaCache for Kontext).
        teacache_coefficients={
            "FLUX.1-Kontext": [-1.04655119e03, 3.12563399e02, -1.69500694e01, 4.10995971e-01, 3.74537863e-02],
            "FLUX.1-dev": [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01],
        },
        default_coefficients_key="FLUX.1-dev",
    )
