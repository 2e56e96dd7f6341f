"""A step gate composed with a module forecaster: ``["fbcache", "taylorseer"]``.

The gate's decisions are replayed by hand with FBCache's rule from the first block's recorded
residuals; on a skipped step every gated site returns the hand Taylor extrapolation (order 1) of
its own outputs recorded on the computed steps; head-block sites always compute. Both CFG layouts
(two denoiser calls per step; one batched call), no state across runs, exact disable.
"""

import pytest
import torch

import dcache

STEPS = 10
THRESHOLD = 0.3


def gen():
    return torch.Generator().manual_seed(0)


def _hidden_in(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _hidden_out(o):
    return o[1] if isinstance(o, tuple) else o  # Flux blocks return (encoder, hidden)


def run_recorded(pipe, kw, attr, site_module, policy, **opts):
    """Run with ``policy`` and record block 0's hidden in/out and ``site_module``'s output per call."""
    block0 = pipe.transformer.transformer_blocks[0]
    rec = {"in": [], "out": [], "site": []}
    hooks = [block0.register_forward_pre_hook(lambda m, a, k: rec["in"].append(_hidden_in(a, k).clone()), with_kwargs=True),
             block0.register_forward_hook(lambda m, a, o: rec["out"].append(_hidden_out(o).clone())),
             site_module.register_forward_hook(lambda m, a, o: rec["site"].append(o.clone()))]
    try:
        with dcache.accelerated(pipe, policy, **opts):
            out = getattr(pipe(generator=gen(), num_inference_steps=STEPS, **kw), attr)
            stats = pipe.dcache.stats()
    finally:
        for h in hooks:
            h.remove()
    return out, stats, rec


def hand_gate(signals, warmup, threshold):
    """FBCache's rule: compare with the reference of the last computed step (True = compute)."""
    ref, out = None, []
    for s, sig in enumerate(signals):
        compute = True
        if ref is not None and s >= warmup:
            d = ((sig - ref).abs().sum() / ref.abs().sum()).item()
            compute = not d < threshold
        if compute:
            ref = sig
        out.append(compute)
    return out


def hand_taylor(history, s):
    """Order-1 TaylorSeer forecast at step ``s`` from [(step, value), ...] of computed steps."""
    (s1, f1) = history[-1]
    if len(history) == 1:
        return f1
    (s0, f0) = history[-2]
    return f1 + (f1 - f0) / (s1 - s0) * (s - s1)


def check_branch(rec_idx, rec, timeline, site_name, head_site, span, tail_site):
    signals = [rec["out"][i] - rec["in"][i] for i in rec_idx]
    gate = [timeline[i]["sites"][span] for i in rec_idx]
    assert set(gate) == {"computed", "forecast"}, gate
    assert [g == "computed" for g in gate] == hand_gate(signals, 1, THRESHOLD)
    history = []
    for s, i in enumerate(rec_idx):
        kind = timeline[i]["sites"][site_name]
        assert timeline[i]["sites"][head_site] == "computed"
        if tail_site:
            assert timeline[i]["sites"][tail_site] == "computed"
        assert kind == gate[s]  # the gate, not taylorseer's own interval, decides
        if kind == "computed":
            history.append((s, rec["site"][i]))
        else:
            torch.testing.assert_close(rec["site"][i], hand_taylor(history, s), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cfg, bn", [(False, 0), (True, 0), (False, 1)], ids=["one-call", "two-call-cfg", "bn1"])
def test_flux_gate_decides_and_taylor_forecasts(cfg, bn):
    import tiny

    pipe, kw, attr, _ = tiny.flux(cfg=cfg)
    pipe.set_progress_bar_config(disable=True)
    tr = pipe.transformer
    site = tr.single_transformer_blocks[0].proj_out
    site_name, head_site = f"{type(tr).__name__}.single_transformer_blocks.0.proj_out", f"{type(tr).__name__}.transformer_blocks.0.attn"
    policy = ["fbcache", "taylorseer"]
    opts = dict(fbcache={"threshold": THRESHOLD, "bn_blocks": bn}, taylorseer={"order": 1})
    out, stats, rec = run_recorded(pipe, kw, attr, site, policy, **opts)
    tl = stats["timeline"]
    # the Bn tail block (single block 1) always computes
    tail = f"{type(tr).__name__}.single_transformer_blocks.1.proj_out" if bn else None
    for b in range(2 if cfg else 1):
        check_branch([i for i, e in enumerate(tl) if e["branch"] == b], rec, tl, site_name, head_site,
                     f"blocks[1:{4 - bn}]", tail)
    assert stats["forecast"] > 0 and stats["reused"] == 0
    # no state across runs; disable exact
    out2, stats2, _ = run_recorded(pipe, kw, attr, site, policy, **opts)
    assert torch.equal(out, out2) and stats == stats2
    base = getattr(pipe(generator=gen(), num_inference_steps=STEPS, **kw), attr)
    with dcache.accelerated(pipe, "none"):
        assert torch.equal(getattr(pipe(generator=gen(), num_inference_steps=STEPS, **kw), attr), base)
    assert not torch.equal(out, base)


def test_batched_cfg_gate_and_forecast(tiny_pipes):
    """PixArt (CFG as one batched call): one branch, gate replayed, forecasts of a gated site by hand."""
    pipe, kw, attr, _ = tiny_pipes("pixart")
    tr = pipe.transformer
    site = tr.transformer_blocks[1].attn1
    name = f"{type(tr).__name__}.transformer_blocks.1.attn1"
    out, stats, rec = run_recorded(pipe, kw, attr, site, ["fbcache", "taylorseer"],
                                   fbcache={"threshold": THRESHOLD}, taylorseer={"order": 1})
    tl = stats["timeline"]
    assert {e["branch"] for e in tl} == {0}
    n = len(tr.transformer_blocks)
    span = f"blocks[1:{n}]"
    signals = [o - i for i, o in zip(rec["in"], rec["out"])]
    gate = [e["sites"][span] for e in tl]
    assert set(gate) == {"computed", "forecast"}
    assert [g == "computed" for g in gate] == hand_gate(signals, 1, THRESHOLD)
    history = []
    for s, e in enumerate(tl):
        if e["sites"][name] == "computed":
            history.append((s, rec["site"][s]))
        else:
            torch.testing.assert_close(rec["site"][s], hand_taylor(history, s), atol=1e-6, rtol=1e-5)


def test_per_sample_gate_cannot_compose(tiny_pipes):
    pipe = tiny_pipes("flux")[0]
    with pytest.raises(ValueError, match="per_sample step gates cannot be composed with a module forecaster"):
        dcache.accelerate(pipe, ["fbcache", "taylorseer"], fbcache={"per_sample": True})
    with pytest.raises(ValueError, match="per_sample step gates cannot be composed with a module forecaster"):
        dcache.accelerate(pipe, ["taylorseer", "fbcache"], fbcache={"per_sample": True})
    assert "dcache" not in pipe.__dict__


def test_policy_spec_composes_with_plus():
    from dcache.eval.policy_spec import parse_policies

    assert parse_policies("fbcache(threshold=0.2,warmup_steps=3)+taylorseer,fbcache") == [
        ("fbcache+taylorseer", {"fbcache": {"threshold": 0.2, "warmup_steps": 3}, "taylorseer": {}}), ("fbcache", {})]
    with pytest.raises(ValueError, match="unknown option"):
        parse_policies("fbcache+taylorseer(bogus=1)")
    with pytest.raises(ValueError, match="policy given twice"):
        parse_policies("fbcache+fbcache")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3", "pixart", "dit", "wan", "cogvideox", "hunyuan_video", "ltx", "qwenimage"])
def test_composition_on_every_block_adapter(family, tiny_pipes):
    """An unbounded gate threshold: after the warm-up every step forecasts; gated sites forecast,
    the timeline says so, nothing is reused, and disable gives the plain pipeline back."""
    pipe, kw, attr, _ = tiny_pipes(family)
    base = getattr(pipe(generator=gen(), num_inference_steps=6, **kw), attr)
    with dcache.accelerated(pipe, ["fbcache", "taylorseer"], fbcache={"threshold": 1e6, "warmup_steps": 2}):
        out = getattr(pipe(generator=gen(), num_inference_steps=6, **kw), attr)
        stats = pipe.dcache.stats()
    gate = [k for e in stats["timeline"] if e["branch"] == 0 for s, k in e["sites"].items() if s.startswith("blocks[")]
    assert gate == ["computed"] * 2 + ["forecast"] * 4
    assert stats["reused"] == 0 and stats["forecast"] > 4 and stats["flops_avoided_fraction"] > 0
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert torch.equal(getattr(pipe(generator=gen(), num_inference_steps=6, **kw), attr), base)
