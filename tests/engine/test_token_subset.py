"""The token-subset granularity, driven by the worked example of docs/engine.md (``half-tokens``:
odd steps recompute the half of each MLP / cross-attention site's tokens whose input changed most
since each was last computed; self-attention reused).

Every partial output is checked against an independent computation: the module's own class
forward on *all* tokens (no hook), its rows at the tokens this test selects with its own replica
of the score, placed into the previous output of the same branch."""

import os
import re

import pytest
import torch

import dcache

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "engine.md")
STEPS = 4


@pytest.fixture(scope="module")
def half_tokens():
    from dcache.registry import _POLICIES

    code = re.search(r"```python token example\n(.*?)```", open(DOC).read(), re.S).group(1)
    exec(compile(code, "docs/engine.md", "exec"), {})
    yield "half-tokens"
    _POLICIES.pop("half-tokens", None)


def _gen(pipe, kw, attr, steps=STEPS):
    return getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=steps, **kw), attr)


class Recorder:
    """Captures every call of a module (inputs, returned output) through a forward hook."""

    def __init__(self, module):
        self.module, self.calls = module, []
        self.h = module.register_forward_hook(
            lambda m, a, k, o: self.calls.append((a, dict(k), o.detach().clone())), with_kwargs=True)

    def remove(self):
        self.h.remove()


def _token_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def check_against_replica(rec, branches, fraction=0.5):
    """Replays the calls of one token site: full on even steps, on odd steps the expected output is
    the previous output of the same branch with the top-``fraction`` tokens by input change replaced
    by the module's class forward on all tokens. Returns the number of partial calls checked."""
    cache, checked = {}, 0
    for i, (args, kwargs, out) in enumerate(rec.calls):
        step, branch = divmod(i, branches)
        x = _token_input(args, kwargs)
        with torch.no_grad():
            fresh = type(rec.module).forward(rec.module, *args, **kwargs)
        if step % 2 == 0:
            torch.testing.assert_close(out, fresh, atol=0, rtol=0)
            cache[branch] = (x.clone(), out.clone())
            continue
        x_ref, y_prev = cache[branch]
        k = int(round(fraction * x.shape[1]))
        idx = (x - x_ref).norm(dim=-1).topk(k, dim=1).indices
        expected = y_prev.clone()
        x_new = x_ref.clone()
        for b in range(x.shape[0]):
            expected[b, idx[b]] = fresh[b, idx[b]]
            x_new[b, idx[b]] = x[b, idx[b]]
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        # The tokens not chosen really kept the cached value (not the fresh one).
        assert not torch.allclose(out, fresh)
        cache[branch] = (x_new, out.clone())
        checked += 1
    return checked


# pipeline -> (token sites to check, denoiser calls per step: 1 batched CFG or none, 2 two-call CFG)
CASES = {
    "flux": (lambda tr: [tr.transformer_blocks[0].ff, tr.transformer_blocks[0].ff_context,
                         tr.single_transformer_blocks[0].proj_mlp], 1),
    "pixart": (lambda tr: [tr.transformer_blocks[0].ff, tr.transformer_blocks[1].attn2], 1),  # batched CFG
    "sd3": (lambda tr: [tr.transformer_blocks[0].ff, tr.transformer_blocks[0].ff_context], 1),  # batched CFG
    "wan": (lambda tr: [tr.blocks[0].ffn, tr.blocks[2].attn2], 2),  # two denoiser calls per step, cross attention
}


@pytest.mark.parametrize("name", list(CASES))
def test_partial_steps_equal_module_on_chosen_tokens(name, half_tokens, tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes(name)
    sites, branches = CASES[name]
    recs = [Recorder(m) for m in sites(pipe.transformer)]
    try:
        with dcache.accelerated(pipe, half_tokens):
            _gen(pipe, kw, attr)
    finally:
        for r in recs:
            r.remove()
    for r in recs:
        assert len(r.calls) == STEPS * branches
        assert check_against_replica(r, branches) == (STEPS // 2) * branches


def test_two_call_cfg_keeps_one_cache_per_branch(half_tokens):
    """Flux true-CFG calls the denoiser twice per step: each branch scatters into its own cache
    (a shared cache would make the uncond call's partial output start from the cond output)."""
    import tiny

    pipe, kw, attr, _ = tiny.flux(cfg=True)
    pipe.set_progress_bar_config(disable=True)
    rec = Recorder(pipe.transformer.transformer_blocks[1].ff)
    try:
        with dcache.accelerated(pipe, half_tokens):
            _gen(pipe, kw, attr)
    finally:
        rec.remove()
    assert len(rec.calls) == 2 * STEPS
    assert check_against_replica(rec, branches=2) == STEPS


def test_follower_uses_the_leaders_tokens(half_tokens, tiny_pipes):
    """Flux single blocks: proj_out runs on the tokens proj_mlp chose in the same call."""
    pipe, kw, attr, _ = tiny_pipes("flux")
    block = pipe.transformer.single_transformer_blocks[1]
    lead, follow = Recorder(block.proj_mlp), Recorder(block.proj_out)
    try:
        with dcache.accelerated(pipe, half_tokens):
            _gen(pipe, kw, attr)
            stats = pipe.dcache.stats()
    finally:
        lead.remove(), follow.remove()
    n = lead.calls[0][0][0].shape[1]
    # proj_out is a bare Linear (no inner layer to count on): its own token count.
    assert stats["tokens"][f"{type(pipe.transformer).__name__}.single_transformer_blocks.1.proj_out"] == \
        {"computed": 3 * n, "total": 4 * n}
    for s in (1, 3):
        changed_lead = (lead.calls[s][2] != lead.calls[s - 1][2]).any(-1)
        changed_follow = (follow.calls[s][2] != follow.calls[s - 1][2]).any(-1)
        assert torch.equal(changed_lead, changed_follow)
        assert changed_lead.sum() == n // 2


def test_inner_token_counts_and_stats(half_tokens, tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    tr = pipe.transformer
    rows, q_calls = [], [0]
    inner = tr.transformer_blocks[0].ff.net[2]  # the MLP's output projection, inside the hooked site
    h1 = inner.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0] * a[0].shape[1]))
    h2 = tr.transformer_blocks[0].attn.to_q.register_forward_hook(lambda *a: q_calls.__setitem__(0, q_calls[0] + 1))
    try:
        with dcache.accelerated(pipe, half_tokens):
            _gen(pipe, kw, attr)
            stats = pipe.dcache.stats()
    finally:
        h1.remove(), h2.remove()
    n = rows[0]
    assert rows == [n, n // 2, n, n // 2]
    assert q_calls[0] == STEPS // 2  # self-attention reused in full on the odd steps
    site = stats["tokens"][f"{type(tr).__name__}.transformer_blocks.0.ff"]
    assert site == {"computed": 3 * n, "total": 4 * n}
    assert 1.0 < stats["estimated_speedup"]


@pytest.mark.parametrize("name", ["flux", "sd3", "pixart", "dit", "wan"])
def test_fraction_one_is_the_plain_pipeline(name, tiny_pipes):
    """All tokens through the gather/scatter path (and self-attention recomputed): bitwise exact."""
    pipe, kw, attr, _ = tiny_pipes(name)
    base = _gen(pipe, kw, attr)
    with dcache.accelerated(pipe, "toca", mlp_ratio=1.0, cross_ratio=1.0, self_ratio=1.0, warmup_steps=1,
                            interval=10, compute_last=False):
        out = _gen(pipe, kw, attr)
        stats = pipe.dcache.stats()
    assert stats["reused"] > 0  # the partial-step path really ran
    assert all(v["computed"] == v["total"] for v in stats["tokens"].values())
    assert torch.equal(out, base)


def test_guard_recomputes_when_the_batch_changes(half_tokens, tiny_pipes):
    """A bare Flux transformer: step 1 (partial) comes with a batch of 2 after a batch of 1 at
    step 0; every site computes in full, so the call equals the plain model's."""
    pipe, _, _, _ = tiny_pipes("flux")
    tr = pipe.transformer
    g = torch.Generator().manual_seed(3)

    def inputs(b, t):
        return dict(hidden_states=torch.randn(b, 64, 4, generator=g), encoder_hidden_states=torch.randn(b, 8, 32, generator=g),
                    pooled_projections=torch.randn(b, 32, generator=g), timestep=torch.full((b,), t),
                    img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3), return_dict=False)

    a, b2 = inputs(1, 1.0), inputs(2, 0.9)
    with torch.no_grad():
        plain = tr(**b2)[0]
        try:
            dcache.accelerate(tr, half_tokens)
            tr(**a)
            out = tr(**b2)[0]
            stats = tr.dcache.stats()
        finally:
            dcache.disable(tr)
    assert stats["steps"] == 2 and stats["reused"] == 0
    assert torch.equal(out, plain)


@pytest.mark.parametrize("name", ["cogvideox", "hunyuan_video", "ltx", "qwenimage", "sd_unet"])
def test_families_without_token_sites_are_refused(name, tiny_pipes):
    pipe, _, _, _ = tiny_pipes(name)
    with pytest.raises(ValueError, match="token") as e:
        dcache.accelerate(pipe, "toca")
    assert "flux" in str(e.value) or "none, static, teacache" in str(e.value)  # names what is supported
    assert not hasattr(pipe, "dcache") or pipe.__dict__.get("dcache") is None
