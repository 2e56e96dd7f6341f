"""The worked example of docs/engine.md (a new granularity in one file + one base class) runs as
written, and does what it says: on odd steps every attention site returns its previous output."""

import os
import re

import torch

import dcache

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "engine.md")


def test_docs_worked_example_adds_a_granularity(tiny_pipes):
    from dcache import installers
    from dcache.registry import _POLICIES

    text = open(DOC).read()
    code = re.search(r"```python example\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, "docs/engine.md", "exec"), namespace)
    pipe, kw, attr, _ = tiny_pipes("flux")
    tr = pipe.transformer
    attn = tr.transformer_blocks[1].attn
    outs, q_calls = [], [0]
    h1 = attn.register_forward_hook(lambda m, a, o: outs.append(o[0].detach().clone()))
    h2 = attn.to_q.register_forward_hook(lambda *a: q_calls.__setitem__(0, q_calls[0] + 1))
    base = getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=5, **kw), attr)
    plain_q, outs[:] = q_calls[0], []
    q_calls[0] = 0
    try:
        with dcache.accelerated(pipe, "attn-every-other"):
            pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=5, **kw)
            stats = pipe.dcache.stats()
        accel_q = q_calls[0]
        after = getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=5, **kw), attr)
    finally:
        h1.remove()
        h2.remove()
        _POLICIES.pop("attn-every-other", None)
        installers._INSTALLERS.pop("attention", None)
    assert len(outs) == 10  # 5 accelerated steps, then the plain run
    for s in (1, 3):
        assert torch.equal(outs[s], outs[s - 1])
    for s in (2, 4):
        assert not torch.equal(outs[s], outs[s - 1])
    assert accel_q == plain_q * 3 // 5  # two of five steps skipped the attention's projections
    assert stats["reused"] == 2 * 2  # the attn site of each of the 2 double blocks, on 2 steps
    assert torch.equal(after, base)
