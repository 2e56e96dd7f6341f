"""easycache: decisions and skipped values replayed by hand from what the chain saw.

Forward hooks record, per denoiser call, the hidden states entering the first block and leaving
the last one (on a skipped step the last block returns what dcache produced). The test then
recomputes the transformation rate, the accumulated error and every decision from those tensors
with the formulas of shared/reference/caching-algorithms.md, and checks that each skipped call
returned ``x_t + (out_c - in_c)``.
"""

import pytest
import torch

import dcache
from test_adapters_policies import BLOCK_FAMILIES as FAMILIES  # tests/ is on sys.path (conftest)

STEPS = 12


def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def flux_cfg():
    import tiny

    pipe, kw, attr, inner = tiny.flux(cfg=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(kw, num_inference_steps=STEPS), attr, inner


def record(pipe, kw, attr, **opts):
    tr = pipe.transformer
    ins, outs = [], []
    last = tr.single_transformer_blocks[-1] if hasattr(tr, "single_transformer_blocks") else tr.transformer_blocks[-1]
    h1 = tr.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, k: ins.append((k["hidden_states"] if "hidden_states" in k else a[0]).clone()), with_kwargs=True)
    h2 = last.register_forward_hook(lambda m, a, o: outs.append((o[1] if isinstance(o, tuple) else o).clone()))
    try:
        with dcache.accelerated(pipe, "easycache", **opts):
            out = getattr(pipe(generator=gen(), **kw), attr)
            stats = pipe.dcache.stats()
    finally:
        h1.remove()
        h2.remove()
    tl = stats["timeline"]
    computed = ["computed" in e["sites"].values() for e in tl]
    return out, stats, tl, computed, ins, outs


def mad(a, b):
    return (a - b).abs().mean().item()


def hand_decisions(xs, ys, computed, threshold, warmup, steps):
    """Replay one branch: xs/ys per step (inputs, last-block outputs); returns the decisions."""
    dec, rate, err, prev_x, in_c, out_c = [], None, 0.0, None, None, None
    for s, (x, y) in enumerate(zip(xs, ys)):
        compute = True
        if not (s < warmup or s == steps - 1 or rate is None or prev_x is None):
            err += rate * mad(x, prev_x) / out_c.abs().mean().item()
            compute = err >= threshold
        if compute:
            err = 0.0
        prev_x = x
        dec.append(compute)
        if computed[s]:  # the rate and the transformation come from the step actually computed
            if in_c is not None:
                rate = mad(y, out_c) / mad(x, in_c)
            in_c, out_c = x, y
    return dec


@pytest.mark.parametrize("share", [True, False], ids=["shared", "per-branch"])
def test_decisions_and_values_by_hand(flux_cfg, share):
    pipe, kw, attr, _ = flux_cfg
    opts = dict(threshold=0.3, warmup_steps=2, share_decision=share)
    out, stats, tl, computed, ins, outs = record(pipe, kw, attr, **opts)
    assert len(ins) == len(outs) == len(tl) == 2 * STEPS
    per_branch = {b: [i for i, e in enumerate(tl) if e["branch"] == b] for b in (0, 1)}
    for b, idx in per_branch.items():
        got = [computed[i] for i in idx]
        assert not all(got) and any(got[2:-1])
        if share and b == 1:
            assert got == [computed[i] for i in per_branch[0]]
            continue
        hand = hand_decisions([ins[i] for i in idx], [outs[i] for i in idx], got, 0.3, 2, STEPS)
        assert got == hand
    # skipped calls returned x_t + (out_c - in_c) of their own branch
    for b, idx in per_branch.items():
        in_c = out_c = None
        for i in idx:
            if computed[i]:
                in_c, out_c = ins[i], outs[i]
            else:
                torch.testing.assert_close(outs[i], ins[i] + (out_c - in_c), atol=1e-6, rtol=1e-5)
    # no state across runs
    out2, stats2, *_ = record(pipe, kw, attr, **opts)
    assert torch.equal(out, out2) and stats == stats2


def test_batched_cfg_one_branch_by_hand(tiny_pipes):
    """PixArt runs CFG as one batched call: one branch, decisions replayed by hand."""
    pipe, kw, attr, _ = tiny_pipes("pixart")
    kw = dict(kw, num_inference_steps=STEPS)
    out, stats, tl, computed, ins, outs = record(pipe, kw, attr, threshold=0.3, warmup_steps=2)
    assert {e["branch"] for e in tl} == {0} and not all(computed)
    assert computed == hand_decisions(ins, outs, computed, 0.3, 2, STEPS)


def test_disable_is_exact_and_errors(flux_cfg, tiny_pipes):
    pipe, kw, attr, _ = flux_cfg
    base = getattr(pipe(generator=gen(), **kw), attr)
    dcache.accelerate(pipe, "easycache", threshold=0.3, warmup_steps=2)
    cached = getattr(pipe(generator=gen(), **kw), attr)
    dcache.disable(pipe)
    assert not torch.equal(cached, base)
    assert torch.equal(getattr(pipe(generator=gen(), **kw), attr), base)
    with pytest.raises(ValueError, match="easycache caches the transformation of a transformer block chain"):
        dcache.accelerate(tiny_pipes("sd_unet")[0], "easycache")
    with pytest.raises(ValueError, match=r"threshold must be in \[0.0, inf\]"):
        dcache.accelerate(pipe, "easycache", threshold=-1)




@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_adapter(family, tiny_pipes):
    """An unbounded threshold: after the warm-up every step but the last reuses; inner calls drop to match."""
    from test_adapters_policies import CallCounter

    pipe, kw, attr, inner = tiny_pipes(family)
    steps = 8
    c = CallCounter(inner)
    base = getattr(pipe(generator=gen(), num_inference_steps=steps, **kw), attr)
    base_calls, c.n = c.n, 0
    with dcache.accelerated(pipe, "easycache", threshold=1e9, warmup_steps=3):
        out = getattr(pipe(generator=gen(), num_inference_steps=steps, **kw), attr)
        tl = pipe.dcache.stats()["timeline"]
    calls = c.n
    c.remove()
    got = ["computed" in e["sites"].values() for e in tl if e["branch"] == 0]
    assert got == [True, True, True, False, False, False, False, True]
    assert calls * steps == base_calls * 4
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert torch.equal(getattr(pipe(generator=gen(), num_inference_steps=steps, **kw), attr), base)
