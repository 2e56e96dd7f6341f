"""dcache's decision code stays out of torch.compile graphs (graph breaks, no failures)."""

import pytest
import torch

import dcache


@pytest.mark.slow
def test_compiled_blocks_with_taylorseer(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    dcache.accelerate(pipe, "taylorseer", interval=3, warmup_steps=1)
    try:
        eager = getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=6, **kw), attr)
        for block in pipe.transformer.transformer_blocks:
            block.compile(fullgraph=False)
        compiled = getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=6, **kw), attr)
        assert pipe.dcache.stats()["forecast"] > 0
    finally:
        dcache.disable(pipe)
        for block in pipe.transformer.transformer_blocks:
            block._compiled_call_impl = None
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
