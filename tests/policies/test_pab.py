"""pab: per-kind broadcast schedules, per-branch outputs under both CFG layouts, refusals."""

import pytest
import torch

import dcache

STEPS = 10


def schedule(n, rng, window=(0.2, 0.9)):
    """Steps at which an attention kind with broadcast range ``rng`` is computed (one branch)."""
    out, last = [], None
    for s in range(n):
        p = s / n
        if not (window[0] <= p < window[1]) or s == n - 1 or last is None or s - last >= rng:
            out.append(s)
            last = s
    return out


# adapter -> (attention modules to watch: (path, kind)), denoiser calls per step
CASES = {
    "flux": ([("transformer_blocks.0.attn", "spatial"), ("single_transformer_blocks.1.attn", "spatial")], 1),
    "wan": ([("blocks.0.attn1", "spatial"), ("blocks.2.attn2", "cross")], 2),
    "pixart": ([("transformer_blocks.0.attn1", "spatial"), ("transformer_blocks.1.attn2", "cross")], 1),
    "dit": ([("transformer_blocks.0.attn1", "spatial")], 1),
    "sd3": ([("transformer_blocks.0.attn", "spatial")], 1),
    "cogvideox": ([("transformer_blocks.0.attn1", "spatial")], 1),
    "qwenimage": ([("transformer_blocks.0.attn", "spatial")], 2),
    "ltx": ([("transformer_blocks.0.attn1", "spatial"), ("transformer_blocks.0.attn2", "cross")], 1),
    "hunyuan_video": ([("transformer_blocks.0.attn", "spatial")], 1),
}
RANGES = {"spatial": 2, "cross": 3}


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_calls_follow_each_kinds_range(tiny_pipes, name):
    pipe, kw, attr, _ = tiny_pipes(name)
    watch, calls_per_step = CASES[name]
    counts = {}
    hooks = []
    for path, kind in watch:
        q = pipe.transformer.get_submodule(path).to_q
        counts[path] = 0
        hooks.append(q.register_forward_hook(lambda *a, p=path: counts.__setitem__(p, counts[p] + 1)))
    opts = {f"{k}_range": r for k, r in RANGES.items() if any(kind == k for _, kind in watch)}
    try:
        with dcache.accelerated(pipe, "pab", **opts):
            pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, **kw)
            stats = pipe.dcache.stats()
    finally:
        for h in hooks:
            h.remove()
    for path, kind in watch:
        assert counts[path] == calls_per_step * len(schedule(STEPS, RANGES[kind])), (path, kind)
    assert stats["reused"] > 0 and stats["flops_avoided_fraction"] > 0


def test_each_branch_gets_its_own_broadcast(tiny_pipes):
    """Two guidance calls per step (Wan): a broadcast step returns the same branch's last computed
    attention output, never the other branch's (diffusers' PAB hands uncond the cond output)."""
    pipe, kw, attr, _ = tiny_pipes("wan")
    attn = pipe.transformer.blocks[1].attn1
    outs = []
    h = attn.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    try:
        with dcache.accelerated(pipe, "pab", spatial_range=3, cross_range=0):
            pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, **kw)
    finally:
        h.remove()
    assert len(outs) == 2 * STEPS
    computed = schedule(STEPS, 3)
    for branch in (0, 1):
        seq, other = outs[branch::2], outs[1 - branch::2]
        for s in range(STEPS):
            if s in computed:
                continue
            src = max(c for c in computed if c < s)
            assert torch.equal(seq[s], seq[src])
            assert not torch.allclose(seq[s], other[src])


def test_batched_cfg_broadcasts_the_whole_batch(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("pixart")
    attn = pipe.transformer.transformer_blocks[2].attn2
    outs = []
    h = attn.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    try:
        with dcache.accelerated(pipe, "pab", spatial_range=0, cross_range=3):
            pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, **kw)
    finally:
        h.remove()
    computed = schedule(STEPS, 3)
    for s in range(STEPS):
        if s not in computed:
            assert outs[s].shape[0] == 2 and torch.equal(outs[s], outs[max(c for c in computed if c < s)])


def test_kinds_the_model_lacks(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    with pytest.raises(ValueError, match="no cross attention"):
        dcache.accelerate(pipe, "pab", cross_range=6)
    with pytest.raises(ValueError, match="no temporal attention"):
        dcache.accelerate(pipe, "pab", temporal_range=4)
    assert "dcache" not in pipe.__dict__
    with dcache.accelerated(pipe, "pab"):  # defaults: cross/temporal off where absent
        pass
    sd, *_ = tiny_pipes("sd_unet")
    with pytest.raises(ValueError, match="support only: none, static, teacache"):
        dcache.accelerate(sd, "pab")
    with pytest.raises(ValueError, match="window"):
        dcache.accelerate(pipe, "pab", window=(0.8, 0.2))


def test_no_state_across_runs_and_disable_exact(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("wan")
    run = lambda: getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, **kw), attr)  # noqa: E731
    plain = run()
    with dcache.accelerated(pipe, "pab"):
        a = run()
        sa = pipe.dcache.stats()
        b = run()
        sb = pipe.dcache.stats()
    assert torch.equal(a, b) and sa["timeline"] == sb["timeline"] and sa["reused"] > 0
    assert not torch.equal(a, plain)
    assert torch.equal(run(), plain)


def test_listed_with_granularity():
    from dcache.registry import get_policy

    assert get_policy("pab").granularity == "attention-output"
    assert get_policy("fastercache").granularity == "guidance"
    assert {"pab", "fastercache"} <= set(dcache.policies("image"))
