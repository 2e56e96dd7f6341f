"""LTX-Video (`LTXVideoTransformer3DModel`)."""

from __future__ import annotations

import torch

from dcache.pipelines.adapters.base import Adapter, BlockSpec, get_arg

_BLOCK = BlockSpec(encoder=None, returns=("hidden",), sites=("attn1", "attn2", "ff"),
                   attention=(("attn1", "spatial"), ("attn2", "cross")))


class LTXAdapter(Adapter):
    def teacache_probe(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        # norm1(x)·(1 + scale_msa) + shift_msa with the block's own scale-shift table (TeaCache's LTX probe).
        hidden = get_arg(block, "hidden_states", args, kwargs)
        temb = get_arg(block, "temb", args, kwargs)
        n = block.scale_shift_table.shape[0]
        ada = block.scale_shift_table[None, None].to(temb.device) + temb.reshape(hidden.size(0), temb.size(1), n, -1)
        shift, scale = ada[:, :, 0], ada[:, :, 1]
        return block.norm1(hidden) * (1 + scale) + shift

    def token_grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
        # LTX packs (frames, height, width) latent tokens in raster order and is told the grid.
        dims = [get_arg(model, k, args, kwargs) for k in ("num_frames", "height", "width")]
        return tuple(int(d) for d in dims) if all(isinstance(d, int) for d in dims) else None


def make() -> Adapter:
    return LTXAdapter(
        family="ltx",
        model_classes=("LTXVideoTransformer3DModel",),
        block_lists=("transformer_blocks",),
        block_specs={"LTXVideoTransformerBlock": _BLOCK},
        teacache_coefficients={
            "LTX-Video": [2.14700694e01, -1.28016453e01, 2.31279151e00, 7.92487521e-01, 9.69274326e-03],
        },
        default_coefficients_key="LTX-Video",
    )
