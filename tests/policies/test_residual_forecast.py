"""A step gate's own residual forecaster (``residual_order`` on ``static`` and ``fbcache``).

On a skipped step the span's output minus its input must be the hand Taylor forecast (restated
here in float64 from TaylorSeer's divided differences) of the span residuals recorded on the
computed steps, hidden and encoder streams alike, per guidance branch; computed steps before
``difference_from`` refresh the value only. The fbcache gate is replayed by hand from block 0's
recorded residuals. cache-dit's DBCache + TaylorSeer calibrator on the same tiny Flux pipeline
gives the same images and cached steps as ``fbcache(residual_order=1)`` (its default
``difference_from=3``).
"""

import logging

import pytest
import torch

import dcache

STEPS = 10


def _split(o):
    return (o[1], o[0]) if isinstance(o, tuple) else (o, None)  # Flux blocks return (encoder, hidden)


def _inputs(args, kwargs):
    h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    e = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return h, e


def run_recorded(pipe, kw, policy, start, **opts):
    """Per denoiser call: block 0's hidden residual (the gate's signal), and the span's (blocks
    ``start``..) hidden and encoder input and output."""
    tr = pipe.transformer
    blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    rec = {"b0_in": [], "b0_out": [], "in": [], "out": []}

    def grab(key, value):
        rec[key].append(tuple(None if t is None else t.detach().double().clone() for t in value))

    hooks = [blocks[0].register_forward_pre_hook(lambda m, a, k: grab("b0_in", _inputs(a, k)), with_kwargs=True),
             blocks[0].register_forward_hook(lambda m, a, o: grab("b0_out", _split(o))),
             blocks[start].register_forward_pre_hook(lambda m, a, k: grab("in", _inputs(a, k)), with_kwargs=True),
             blocks[-1].register_forward_hook(lambda m, a, o: grab("out", _split(o)))]
    try:
        with dcache.accelerated(pipe, policy, **opts):
            torch.manual_seed(0)
            out = pipe(num_inference_steps=STEPS, **kw).images
            stats = pipe.dcache.stats()
    finally:
        for h in hooks:
            h.remove()
    return out, stats, rec


def hand_forecast(history, s, order, difference_from):
    """TaylorSeer's terms over the computed steps [(step, value)], then Σ Fᵢ·kⁱ/i! at step ``s``."""
    terms, last = [], None
    for step, value in history:
        if last is None or step < difference_from:
            terms = [value]
        else:
            d = step - last
            new = [value]
            for i in range(min(len(terms), order)):
                new.append((new[i] - terms[i]) / d)
            terms = new
        last = step
    k, out, fact = s - last, torch.zeros_like(terms[0]), 1.0
    for i, t in enumerate(terms):
        fact *= max(i, 1)
        out = out + t * k**i / fact
    return out


def hand_gate(signals, warmup, threshold):
    ref, out = None, []
    for s, sig in enumerate(signals):
        compute = True
        if ref is not None and s >= warmup:
            compute = not ((sig - ref).abs().mean() / ref.abs().mean()).item() < threshold
        if compute:
            ref = sig
        out.append(compute)
    return out


def check(rec, stats, order, difference_from, span, gate=None):
    tl = stats["timeline"]
    informative = 0
    for b in sorted({e["branch"] for e in tl}):
        idx = [i for i, e in enumerate(tl) if e["branch"] == b]
        kinds = [tl[i]["sites"][span] for i in idx]
        assert set(kinds) == {"computed", "reused"}, kinds
        if gate is not None:
            signals = [rec["b0_out"][i][0] - rec["b0_in"][i][0] for i in idx]
            assert [k == "computed" for k in kinds] == hand_gate(signals, *gate)
        hist_h, hist_e = [], []
        for s, i in enumerate(idx):
            (h_in, e_in), (h_out, e_out) = rec["in"][i], rec["out"][i]
            if kinds[s] == "computed":
                hist_h.append((s, h_out - h_in))
                hist_e.append((s, e_out - e_in))
                continue
            want_h = hand_forecast(hist_h, s, order, difference_from)
            torch.testing.assert_close(h_out - h_in, want_h, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(e_out - e_in, hand_forecast(hist_e, s, order, difference_from),
                                       atol=1e-5, rtol=1e-4)
            # A skipped step where the difference rule or the order decides the value.
            if len(hist_h) > 1 and not torch.allclose(want_h, hist_h[-1][1]):
                informative += 1
            if len(hist_h) > 1 and hist_h[-1][0] < difference_from <= hist_h[-1][0] + 1:
                informative += 1
    assert informative, "no skipped step tells the forecast from plain reuse"


@pytest.mark.parametrize("cfg", [False, True], ids=["one-call", "two-call-cfg"])
@pytest.mark.parametrize("order, difference_from", [(1, 3), (1, 0), (2, 0)])
def test_static_residual_forecast_is_hand_taylor(cfg, order, difference_from):
    import tiny

    pipe, kw, _, _ = tiny.flux(cfg=cfg)
    pipe.set_progress_bar_config(disable=True)
    opts = dict(interval=3, warmup_steps=2, residual_order=order, difference_from=difference_from)
    out, stats, rec = run_recorded(pipe, kw, "static", 0, **opts)
    check(rec, stats, order, difference_from, "blocks[0:4]")
    # no state across runs; the forecast differs from plain reuse
    out2, stats2, _ = run_recorded(pipe, kw, "static", 0, **opts)
    assert torch.equal(out, out2) and stats == stats2
    reuse, _, _ = run_recorded(pipe, kw, "static", 0, interval=3, warmup_steps=2)
    assert not torch.equal(out, reuse)


@pytest.mark.parametrize("cfg", [False, True], ids=["one-call", "two-call-cfg"])
def test_fbcache_gate_with_residual_forecast(cfg):
    import tiny

    pipe, kw, _, _ = tiny.flux(cfg=cfg)
    pipe.set_progress_bar_config(disable=True)
    opts = dict(threshold=0.3, warmup_steps=2, residual_order=1)
    out, stats, rec = run_recorded(pipe, kw, "fbcache", 1, **opts)
    check(rec, stats, 1, 3, "blocks[1:4]", gate=(2, 0.3))
    torch.manual_seed(0)
    base = pipe(num_inference_steps=STEPS, **kw).images
    with dcache.accelerated(pipe, "none"):
        torch.manual_seed(0)
        assert torch.equal(pipe(num_inference_steps=STEPS, **kw).images, base)


@pytest.mark.parametrize("cfg", [False, True], ids=["one-call", "two-call-cfg"])
def test_same_as_cache_dit_dbcache_taylorseer(cfg):
    cache_dit = pytest.importorskip("cache_dit")
    import tiny

    logging.getLogger("cache_dit").setLevel(logging.ERROR)
    pipe, kw, _, _ = tiny.flux(cfg=cfg)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(kw, num_inference_steps=12)
    cfg_cd = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.3,
                                     max_warmup_steps=2, max_cached_steps=-1, num_inference_steps=12,
                                     enable_separate_cfg=cfg)
    cache_dit.enable_cache(pipe.transformer, cache_config=cfg_cd,
                           calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1))
    try:
        cache_dit.refresh_context(pipe.transformer, num_inference_steps=12)
        torch.manual_seed(0)
        ref = pipe(**kw).images
        st = cache_dit.summary(pipe.transformer)[0]
        ref_cached = [sorted(st.cached_steps)] + ([sorted(st.cfg_cached_steps)] if cfg else [])
    finally:
        cache_dit.disable_cache(pipe.transformer)
    with dcache.accelerated(pipe, "fbcache", threshold=0.3, warmup_steps=2, residual_order=1):
        torch.manual_seed(0)
        out = pipe(**kw).images
        tl = pipe.dcache.stats()["timeline"]
    cached = [[e["step"] for e in tl if e["branch"] == b and "reused" in e["sites"].values()] for b in range(1 + cfg)]
    assert all(ref_cached) and cached == ref_cached
    # cached steps right after a computed step before 3 (no difference yet) and later ones (forecast)
    assert any(s <= 3 for s in cached[0]) and any(s > 4 for s in cached[0])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_residual_order_refusals(tiny_pipes):
    pipe = tiny_pipes("flux")[0]
    with pytest.raises(ValueError, match="residual_order forecasts the cached span's residual, a module forecaster"):
        dcache.accelerate(pipe, ["fbcache", "taylorseer"], fbcache={"residual_order": 1})
    with pytest.raises(ValueError, match="residual_order forecasts the cached span's residual, a module forecaster"):
        dcache.accelerate(pipe, ["taylorseer", "static"], static={"residual_order": 1})
    with pytest.raises(ValueError, match="cannot be combined with per_sample"):
        dcache.accelerate(pipe, "fbcache", residual_order=1, per_sample=True)
    with pytest.raises(ValueError, match=r"residual_order must be in \[0, 4\]"):
        dcache.accelerate(pipe, "static", residual_order=5)
    with pytest.raises(ValueError, match="difference_from must be an int"):
        dcache.accelerate(pipe, "fbcache", difference_from=1.5)
    assert "dcache" not in pipe.__dict__


@pytest.mark.parametrize("cfg", [False, True], ids=["one-call", "two-call-cfg"])
def test_static_steps_mask_schedule_and_reuse(cfg):
    """An explicit schedule: the first step and the last compute whatever the mask says, steps past
    the mask's end follow ``interval``; a reused step adds the last computed residual (hand check)."""
    import tiny

    pipe, kw, _, _ = tiny.flux(cfg=cfg)
    pipe.set_progress_bar_config(disable=True)
    mask = [0, 0, 1, 0, 0, 0, 1]  # 10 steps: past the end (7..) interval 2 from step 6
    out, stats, rec = run_recorded(pipe, kw, "static", 0, steps_mask=mask, interval=2)
    tl = stats["timeline"]
    for b in range(1 + cfg):
        idx = [i for i, e in enumerate(tl) if e["branch"] == b]
        computed = [s for s, i in enumerate(idx) if tl[i]["sites"]["blocks[0:4]"] == "computed"]
        assert computed == [0, 2, 6, 8, 9]
        last = None
        for s, i in enumerate(idx):
            (h_in, _), (h_out, _) = rec["in"][i], rec["out"][i]
            if s in computed:
                last = h_out - h_in
            else:
                torch.testing.assert_close(h_out - h_in, last, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"static: steps_mask must be a non-empty list of 0 and 1"):
        dcache.accelerate(pipe, "static", steps_mask=[1, 2])


@pytest.mark.parametrize("ends, want", [(0.0, [0, 1, 4, 6, 9]), (0.4, [0, 1, 3, 7, 9])])
def test_static_budget_schedule(ends, want):
    """``budget=5`` of 10 steps, warm-up 2: the steps worked out by hand from the documented warp
    (u = 1/3, 2/3, 1 mapped onto (1, 9]; at ends=0.4, g(1/3) = 1/3 - 0.4·sin(2π/3)/2π = 0.278)."""
    import tiny

    pipe, kw, _, _ = tiny.flux(cfg=True)
    pipe.set_progress_bar_config(disable=True)
    with dcache.accelerated(pipe, "static", budget=5, warmup_steps=2, ends=ends):
        torch.manual_seed(0)
        pipe(num_inference_steps=STEPS, **kw)
        tl = pipe.dcache.stats()["timeline"]
    for b in (0, 1):
        assert [e["step"] for e in tl if e["branch"] == b and e["sites"]["blocks[0:4]"] == "computed"] == want
    with pytest.raises(ValueError, match=r"static: ends must be in \[0.0, 0.95\]"):
        dcache.accelerate(pipe, "static", budget=5, ends=1.0)


@pytest.mark.parametrize("cfg", [False, True], ids=["one-call", "two-call-cfg"])
@pytest.mark.parametrize("order", [0, 1])
def test_static_output_level(cfg, order):
    """level="output": a skipped call runs nothing of the transformer (its input embedder is not
    called) and returns the branch's last computed output (order 0) or its hand Taylor forecast."""
    import tiny

    pipe, kw, _, _ = tiny.flux(cfg=cfg)
    pipe.set_progress_bar_config(disable=True)
    tr = pipe.transformer
    outs, embeds = [], []
    hooks = [tr.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o.sample).double().clone())),
             tr.x_embedder.register_forward_hook(lambda m, a, o: embeds.append(1))]
    try:
        with dcache.accelerated(pipe, "static", interval=3, warmup_steps=2, level="output", residual_order=order,
                                difference_from=0):
            torch.manual_seed(0)
            pipe(num_inference_steps=STEPS, **kw)
            tl = pipe.dcache.stats()["timeline"]
    finally:
        for h in hooks:
            h.remove()
    assert len(outs) == len(tl) and len(embeds) == sum("computed" in e["sites"].values() for e in tl)
    informative = 0
    for b in range(1 + cfg):
        idx = [i for i, e in enumerate(tl) if e["branch"] == b]
        kinds = [tl[i]["sites"]["model"] for i in idx]
        assert kinds == ["computed", "computed", "reused", "reused", "computed", "reused", "reused", "computed",
                         "reused", "computed"]
        hist = []
        for s, i in enumerate(idx):
            if kinds[s] == "computed":
                hist.append((s, outs[i]))
                continue
            want = hand_forecast(hist, s, order, 0)
            torch.testing.assert_close(outs[i], want, atol=1e-5, rtol=1e-4)
            informative += not torch.allclose(want, hist[-1][1])
    assert (informative > 1 + cfg) if order else informative == 0
    with pytest.raises(ValueError, match="level 'output' skips the whole denoiser call"):
        dcache.accelerate(pipe, ["static", "taylorseer"], static={"level": "output"})
    with pytest.raises(ValueError, match="level 'output' skips the whole denoiser call"):
        dcache.accelerate(pipe, ["taylorseer", "static"], static={"level": "output"})
    assert "dcache" not in pipe.__dict__


@pytest.mark.parametrize("difference_from", [0, 3])
def test_taylorseer_difference_from(difference_from):
    """taylorseer's forecast of one site is the hand Taylor forecast of that site's computed
    values, with no difference formed by computed steps before ``difference_from``."""
    import tiny

    pipe, kw, _, _ = tiny.flux(cfg=True)
    pipe.set_progress_bar_config(disable=True)
    site = pipe.transformer.single_transformer_blocks[0].proj_out
    name = f"{type(pipe.transformer).__name__}.single_transformer_blocks.0.proj_out"
    outs = []
    hook = site.register_forward_hook(lambda m, a, o: outs.append(o.double().clone()))
    try:
        with dcache.accelerated(pipe, "taylorseer", interval=3, warmup_steps=2, order=1,
                                difference_from=difference_from):
            torch.manual_seed(0)
            pipe(num_inference_steps=STEPS, **kw)
            tl = pipe.dcache.stats()["timeline"]
    finally:
        hook.remove()
    for b in (0, 1):
        idx = [i for i, e in enumerate(tl) if e["branch"] == b]
        hist, forecasts = [], 0
        for s, i in enumerate(idx):
            if tl[i]["sites"][name] == "computed":
                hist.append((s, outs[i]))
                continue
            forecasts += 1
            torch.testing.assert_close(outs[i], hand_forecast(hist, s, 1, difference_from), atol=1e-5, rtol=1e-4)
            if s in (2, 3):  # after warm-up steps 0, 1: reuse with difference_from=3, a line with 0
                assert torch.allclose(outs[i], hist[-1][1]) == (difference_from == 3)
        assert forecasts >= 4
