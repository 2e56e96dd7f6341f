"""fastercache: CFG-Cache on both CFG layouts and attention extrapolation, checked against a
frequency split and schedules written out here (not the policy's own helpers)."""

import copy
import math

import pytest
import torch

import dcache

STEPS = 12


def disc(h, w, radius_frac=0.2):
    m = torch.zeros(h, w, dtype=torch.bool)
    for y in range(h):
        for x in range(w):
            m[y, x] = (y - h // 2) ** 2 + (x - w // 2) ** 2 <= (radius_frac * min(h, w)) ** 2
    return m


def rebuild(cond, cond_prev, uncond_prev, wl, wh):
    """uncond = ifft(F(cond) + wl·LF(F(u') − F(c')) + wh·HF(F(u') − F(c'))) on grids (..., H, W)."""
    f = lambda x: torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))  # noqa: E731
    m = disc(cond.shape[-2], cond.shape[-1])
    d = f(uncond_prev) - f(cond_prev)
    s = f(cond) + wl * torch.where(m, d, 0) + wh * torch.where(m, 0, d)
    return torch.fft.ifft2(torch.fft.ifftshift(s, dim=(-2, -1))).real.float()


def uncond_computed(n, start=0.36, skip=5):
    return [s for s in range(n) if s / n < start or s % skip == 0 or s == n - 1]


def weights(s, n):
    p = s / n
    return (1.1 if 0.1 <= p < 0.9 else 1.0), (1.1 if 0.7 <= p < 1.0 else 1.0)


def flux_tokens_to_grid(x, h, w):
    b, n, c = x.shape
    return x.reshape(b, 1, h, w, c).permute(0, 1, 4, 2, 3)


def _record_calls(model):
    calls = []

    def hook(m, args, kwargs, out):
        kw = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        kw["_args"] = tuple(a.detach().clone() for a in args)
        calls.append((kw,
                      (out[0] if isinstance(out, tuple) else out.sample).detach().clone()))

    return calls, model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name,composed", [("flux", False), ("wan", False), ("flux", True)])
def test_sequential_cfg_uncond_rebuilt_from_cond(name, composed):
    """Two denoiser calls per step (where diffusers' FasterCache fails with an IndexError): the
    second call is not made on cached steps and its output is the frequency-split rebuild."""
    import tiny

    pipe, kw, attr, _ = tiny.flux(cfg=True) if name == "flux" else tiny.wan()
    pipe.set_progress_bar_config(disable=True)
    calls, h = _record_calls(pipe.transformer)
    inner = []
    first = (pipe.transformer.transformer_blocks if name == "flux" else pipe.transformer.blocks)[0]
    h2 = first.register_forward_pre_hook(lambda m, a: inner.append(1))
    try:
        # Composed: TaylorSeer forecasts the features, CFG-Cache rebuilds uncond from its cond output.
        policy, opts = (["taylorseer", "fastercache"], {"taylorseer": {"interval": 3}}) if composed \
            else ("fastercache", {"attention_skip_range": 0})
        with dcache.accelerated(pipe, policy, **opts):
            pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, **kw)
            stats = pipe.dcache.stats()
    finally:
        h.remove()
        h2.remove()
    assert len(calls) == 2 * STEPS
    assert (stats["forecast"] > 0) == composed
    tl = stats["timeline"]
    computed = [e["step"] for e in tl if e["branch"] == 1 and e["sites"].get("uncond") == "computed"]
    assert computed == uncond_computed(STEPS)
    assert sum(e["sites"].get("uncond") == "reused" for e in tl) == STEPS - len(computed)
    assert len(inner) == STEPS + len(computed)  # the skipped uncond calls never reach the model
    last_full = None
    for s in range(STEPS):
        kwc, cond = calls[2 * s]
        _, uncond = calls[2 * s + 1]
        if s in computed:
            last_full = (cond, uncond)
            continue
        wl, wh = weights(s, STEPS)
        if name == "flux":
            ids = kwc["img_ids"]
            gh, gw = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
            g = lambda x: flux_tokens_to_grid(x, gh, gw)  # noqa: E731
            want = rebuild(g(cond), g(last_full[0]), g(last_full[1]), wl, wh)
            want = want.permute(0, 1, 3, 4, 2).reshape(cond.shape)
        else:
            want = rebuild(cond, last_full[0], last_full[1], wl, wh)
        torch.testing.assert_close(uncond, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,cond_half", [("pixart", 1), ("dit", 0)])
def test_batched_cfg_runs_the_conditional_half_only(name, cond_half):
    """One call on 2B rows: on cached steps the denoiser sees B rows (the conditional half, which
    this pipeline puts first or second) and the other half is the rebuild."""
    import tiny

    pipe, kw, attr, _ = tiny.build(name)
    plain = copy.deepcopy(pipe.transformer)
    calls, h = _record_calls(pipe.transformer)
    rows = []
    h2 = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        with dcache.accelerated(pipe, "fastercache", attention_skip_range=0):
            pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, **kw)
    finally:
        h.remove()
        h2.remove()
    full = uncond_computed(STEPS)
    assert rows == [2 if s in full else 1 for s in range(STEPS)]
    last = None
    for s, (kwargs, out) in enumerate(calls):
        halves = out.chunk(2)
        if s in full:
            last = halves
            continue
        cond = halves[cond_half]
        # the conditional half is the plain model on the conditional rows
        sl = slice(cond_half, cond_half + 1)
        take = lambda v: v[sl] if torch.is_tensor(v) and v.ndim and v.shape[0] == 2 else v  # noqa: E731
        half_kwargs = {k: take(v) for k, v in kwargs.items() if k != "_args"}
        ref = plain(*[take(a) for a in kwargs["_args"]], **half_kwargs)
        ref = ref[0] if isinstance(ref, tuple) else ref.sample
        torch.testing.assert_close(cond, ref, atol=1e-5, rtol=1e-5)
        wl, wh = weights(s, STEPS)
        want = rebuild(cond, last[cond_half], last[1 - cond_half], wl, wh)
        torch.testing.assert_close(halves[1 - cond_half], want, atol=1e-5, rtol=1e-5)


def test_attention_extrapolated_from_the_last_two_computed_outputs():
    import tiny

    pipe, kw, attr, _ = tiny.build("wan")
    attn = pipe.transformer.blocks[1].attn1
    outs, inner = [], []
    h = attn.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    h2 = attn.to_q.register_forward_hook(lambda *a: inner.append(1))
    try:
        with dcache.accelerated(pipe, "fastercache", cfg_skip_range=1):  # both branches always computed
            pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, **kw)
    finally:
        h.remove()
        h2.remove()
    assert len(outs) == 2 * STEPS
    start = 0.32
    reused = [s for s in range(STEPS) if s / STEPS >= start and s % 2 != 0 and s != STEPS - 1]
    assert len(inner) == 2 * (STEPS - len(reused))
    for branch in (0, 1):
        seq = outs[branch::2]
        computed = []
        for s in range(STEPS):
            if s in reused:
                w = min(max((s / STEPS - start) / (1 - start), 0.0), 1.0)
                a, b = seq[computed[-1]], seq[computed[-2]]
                torch.testing.assert_close(seq[s], a + w * (a - b), atol=1e-6, rtol=1e-6)
            else:
                computed.append(s)


def test_guidance_distilled_models_refused():
    import tiny
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    with pytest.raises(ValueError, match="guidance-distilled"):
        dcache.accelerate(tr, "fastercache")
    pipe, *_ = tiny.build("hunyuan_video")
    with pytest.raises(ValueError, match="guidance-distilled"):
        dcache.accelerate(pipe, "fastercache")
    assert "dcache" not in pipe.__dict__


def test_unet_refused_and_bad_options():
    import tiny

    pipe, *_ = tiny.build("sd_unet")
    with pytest.raises(ValueError, match="support only: none, static, teacache"):
        dcache.accelerate(pipe, "fastercache")
    with pytest.raises(ValueError, match="cfg_skip_range"):
        dcache.accelerate(pipe, "fastercache", cfg_skip_range=0)
    with pytest.raises(ValueError, match="low_frequency_window"):
        dcache.accelerate(pipe, "fastercache", low_frequency_window=(0.9, 0.1))


def test_no_state_across_runs_and_disable_exact(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("wan")
    run = lambda: getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, **kw), attr)  # noqa: E731
    plain = run()
    with dcache.accelerated(pipe, "fastercache"):
        a = run()
        sa = pipe.dcache.stats()
        b = run()
        sb = pipe.dcache.stats()
    assert torch.equal(a, b) and sa["timeline"] == sb["timeline"] and sa["reused"] == sb["reused"] > 0
    assert not torch.equal(a, plain)
    assert torch.equal(run(), plain)


def _bare_loop(model, steps, latents, cond_kw, uncond_kw, scale=4.0):
    """A hand-written true-CFG Euler loop on a bare Flux transformer (two calls per step)."""
    x = latents.clone()
    outs = []
    for i in range(steps):
        t = torch.full((x.shape[0],), 1.0 - i / steps)
        c = model(hidden_states=x, timestep=t, **cond_kw, return_dict=False)[0]
        u = model(hidden_states=x, timestep=t, **uncond_kw, return_dict=False)[0]
        outs.append((c, u))
        x = x - (1.0 / steps) * (u + scale * (c - u))
    return outs


def test_composed_with_taylorseer_each_part_does_its_own_job():
    """["taylorseer", "fastercache"]: the conditional pass is exactly TaylorSeer's (a TaylorSeer-only
    copy fed the same inputs gives the same outputs), the unconditional one is CFG-Cache's rebuild."""
    import tiny

    pipe, *_ = tiny.flux(cfg=True)
    tr = pipe.transformer
    alone = copy.deepcopy(tr)
    torch.manual_seed(1)
    n, steps = 16, STEPS
    ids = torch.stack([torch.zeros(n), torch.arange(n) // 4, torch.arange(n) % 4], dim=1).float()
    common = dict(img_ids=ids, txt_ids=torch.zeros(8, 3), guidance=None)
    cond_kw = dict(encoder_hidden_states=torch.randn(1, 8, 32), pooled_projections=torch.randn(1, 32), **common)
    uncond_kw = dict(encoder_hidden_states=torch.randn(1, 8, 32), pooled_projections=torch.randn(1, 32), **common)
    latents = torch.randn(1, n, 4)
    # The bare model has no loop: steps and branches come from the timesteps (equal within a step).
    dcache.accelerate(tr, ["taylorseer", "fastercache"], taylorseer={"interval": 3})
    dcache.accelerate(alone, "taylorseer", interval=3)
    outs = _bare_loop(tr, steps, latents, cond_kw, uncond_kw)
    stats = tr.dcache.stats()
    x = latents.clone()
    for i, (c, _) in enumerate(outs):  # TaylorSeer alone, branch 0 fed the composed run's inputs
        t = torch.full((1,), 1.0 - i / steps)
        torch.testing.assert_close(c, alone(hidden_states=x, timestep=t, **cond_kw, return_dict=False)[0],
                                   atol=0, rtol=0)
        u = outs[i][1]
        x = x - (1.0 / steps) * (u + 4.0 * (c - u))
    # Without a loop length the bare run has no progress: CFG-Cache then computes every uncond call,
    # so check the rebuild on a pipeline run instead (test_sequential_cfg_...); here the taylorseer part.
    assert stats["forecast"] > 0
    dcache.disable(tr)
    dcache.disable(alone)


def test_composition_rules(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    with pytest.raises(ValueError, match="one policy per granularity"):
        dcache.accelerate(pipe, ["teacache", "fbcache"])
    with pytest.raises(ValueError, match="attention reuse was asked for"):
        dcache.accelerate(pipe, ["taylorseer", "fastercache"], fastercache={"attention_skip_range": 2})
    assert "dcache" not in pipe.__dict__
    with pytest.raises(ValueError, match="forecasts the same modules"):
        dcache.accelerate(pipe, ["pab", "taylorseer"])
    assert "dcache" not in pipe.__dict__


# adapter -> (first block path, CFG layout)
LAYOUTS = {"sd3": ("transformer_blocks.0", "batched"), "cogvideox": ("transformer_blocks.0", "batched"),
           "ltx": ("transformer_blocks.0", "batched"), "qwenimage": ("transformer_blocks.0", "sequential")}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_inner_calls_drop_on_the_other_adapters(tiny_pipes, name):
    """The first block's calls (and their batch rows) follow the uncond schedule; with default
    attention reuse the attention projections drop further on the steps the schedule says."""
    pipe, kw, attr, _ = tiny_pipes(name)
    path, layout = LAYOUTS[name]
    block = pipe.transformer.get_submodule(path)
    rows, q = [], []
    h = block.register_forward_pre_hook(lambda m, a, k: rows.append(
        (a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True)
    h2 = block.attn1.to_q.register_forward_hook(lambda *a: q.append(1)) if hasattr(block, "attn1") \
        else block.attn.to_q.register_forward_hook(lambda *a: q.append(1))
    try:
        with dcache.accelerated(pipe, "fastercache", attention_skip_range=0):
            pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, **kw)
        cfg_only = len(q)
        q.clear()
        rows_cfg = list(rows)
        with dcache.accelerated(pipe, "fastercache"):
            pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, **kw)
    finally:
        h.remove()
        h2.remove()
    full = uncond_computed(STEPS)
    if layout == "batched":
        assert rows_cfg == [2 if s in full else 1 for s in range(STEPS)]
        assert cfg_only == STEPS
        reused = [s for s in range(STEPS) if s / STEPS >= 0.32 and s % 2 and s != STEPS - 1]
        assert len(q) == STEPS - len(reused)
    else:
        assert len(rows_cfg) == cfg_only == STEPS + len(full)
        assert len(q) < cfg_only


def test_bench_syntax_composes_policies():
    from dcache.eval.policy_spec import parse_policies

    assert parse_policies("taylorseer(interval=3)+fastercache(cfg_skip_range=4),pab") == [
        ("taylorseer+fastercache", {"taylorseer": {"interval": 3}, "fastercache": {"cfg_skip_range": 4}}),
        ("pab", {})]
    with pytest.raises(ValueError, match="one policy per granularity"):
        parse_policies("teacache+fbcache")
    with pytest.raises(ValueError, match="cfg_skip_range"):
        parse_policies("taylorseer+fastercache(cfg_skip_range=0)")
