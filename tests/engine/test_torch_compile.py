"""torch.compile on an accelerated denoiser: `none` compiles with fullgraph=True, regional compile
keeps the blocks' ops in graphs, a second generation compiles nothing new (FLOPs are measured
with compiled regions forced eager), and a caching policy under fullgraph=True fails with an error
that names regional compile. The eager backend keeps this in the default run."""

import pytest
import torch

import dcache


class CountingBackend:
    """An eager backend that records every graph dynamo hands it (one per compile/recompile)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    def linear_ops(self):
        return sum(1 for g in self.graphs for t in g if t is torch._C._nn.linear)


def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_none_compiles_with_fullgraph(tiny_pipes, fresh_dynamo):
    pipe, kw, attr, _ = tiny_pipes("flux_micro")
    base = getattr(pipe(generator=gen(), num_inference_steps=3, **kw), attr)
    tr = pipe.transformer
    backend = CountingBackend()
    dcache.accelerate(pipe, "none")
    try:
        pipe.transformer = torch.compile(tr, fullgraph=True, backend=backend)
        out = getattr(pipe(generator=gen(), num_inference_steps=3, **kw), attr)
    finally:
        pipe.transformer = tr
        dcache.disable(pipe)
    assert torch.equal(out, base)
    assert len(backend.graphs) == 1, "fullgraph=True must give exactly one graph"
    # Every linear of the 4 blocks is in it (Flux double block: >= 12 linears, single: >= 4).
    assert backend.linear_ops() >= 12 + 4


def test_regional_compile_after_accelerate(tiny_pipes, fresh_dynamo):
    pipe, kw, attr, _ = tiny_pipes("flux_micro")
    tr = pipe.transformer
    backend = CountingBackend()
    dcache.accelerate(pipe, "taylorseer", interval=2, warmup_steps=1)
    try:
        eager = getattr(pipe(generator=gen(), num_inference_steps=4, **kw), attr)
        for block in list(tr.transformer_blocks) + list(tr.single_transformer_blocks):
            block.compile(backend=backend)
        compiled = getattr(pipe(generator=gen(), num_inference_steps=4, **kw), attr)
        first = len(backend.graphs)
        again = getattr(pipe(generator=gen(), num_inference_steps=4, **kw), attr)
        stats = pipe.dcache.stats()
    finally:
        dcache.disable(pipe)
        for block in list(tr.transformer_blocks) + list(tr.single_transformer_blocks):
            block._compiled_call_impl = None
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, compiled)
    assert stats["forecast"] > 0
    # The blocks' own ops (norms, modulation linears, attention projections) are in graphs.
    assert backend.linear_ops() >= 6
    # Bounded: the graphs of the first compiled generation, and not one more afterwards.
    assert 0 < first <= 40 and len(backend.graphs) == first


def test_flops_are_measured_outside_compiled_frames(tiny_pipes, fresh_dynamo):
    """Compile first, accelerate after: the first call (which measures FLOPs) must not leave a
    dispatch-mode guard behind that makes the second call recompile."""
    pipe, kw, attr, _ = tiny_pipes("flux_micro")
    tr = pipe.transformer
    backend = CountingBackend()
    for block in tr.transformer_blocks:
        block.compile(backend=backend)
    try:
        with dcache.accelerated(pipe, "static", interval=2):
            from dcache import flops

            flops.tables_for(tr).clear()
            pipe(generator=gen(), num_inference_steps=3, **kw)
            n = len(backend.graphs)
            pipe(generator=gen(), num_inference_steps=3, **kw)
            assert pipe.dcache.stats()["flops_avoided_fraction"] > 0
    finally:
        for block in tr.transformer_blocks:
            block._compiled_call_impl = None
    assert len(backend.graphs) == n


def test_caching_policy_with_fullgraph_names_regional_compile(tiny_pipes, fresh_dynamo):
    pipe, kw, attr, _ = tiny_pipes("flux_micro")
    tr = pipe.transformer
    dcache.accelerate(pipe, "fbcache")
    try:
        pipe.transformer = torch.compile(tr, fullgraph=True, backend="eager")
        with pytest.raises(Exception, match="compile_repeated_blocks"):
            pipe(generator=gen(), num_inference_steps=2, **kw)
    finally:
        pipe.transformer = tr
        dcache.disable(pipe)
