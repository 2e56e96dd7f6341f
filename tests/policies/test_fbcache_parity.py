"""fbcache computes exactly the steps cache-dit's DBCache computes, at the same settings.

Both run on the same tiny random-init Flux pipeline (real diffusers classes, real cache-dit); the
per-step compute/cache masks are read from cache-dit's own summary (``cached_steps`` and, for the
second CFG branch, ``cfg_cached_steps``) and from dcache's timeline, and the images must match.
"""

import logging

import pytest
import torch

import dcache

cache_dit = pytest.importorskip("cache_dit")

STEPS = 12


def _run_cache_dit(pipe, kw, cfg_branches, **opts):
    mapping = dict(Fn_compute_blocks=opts.get("fn_blocks", 1), Bn_compute_blocks=opts.get("bn_blocks", 0),
                   residual_diff_threshold=opts["threshold"], max_warmup_steps=opts.get("warmup_steps", 1),
                   warmup_interval=opts.get("warmup_interval", 1),
                   max_continuous_cached_steps=opts.get("max_consecutive", 0) or -1,
                   max_cached_steps=-1 if opts.get("max_cached_steps") is None else opts["max_cached_steps"],
                   num_inference_steps=STEPS, enable_separate_cfg=cfg_branches == 2)
    if opts.get("steps_mask") is not None:
        mapping.update(steps_computation_mask=opts["steps_mask"], steps_computation_policy=opts.get("steps_policy", "dynamic"))
    cache_dit.enable_cache(pipe.transformer, cache_config=cache_dit.DBCacheConfig(**mapping))
    try:
        cache_dit.refresh_context(pipe.transformer, num_inference_steps=STEPS)
        torch.manual_seed(0)
        out = pipe(**kw).images
        st = cache_dit.summary(pipe.transformer)[0]
        cached = [sorted(st.cached_steps)] + ([sorted(st.cfg_cached_steps)] if cfg_branches == 2 else [])
    finally:
        cache_dit.disable_cache(pipe.transformer)
    return out, cached


def _run_dcache(pipe, kw, cfg_branches, **opts):
    with dcache.accelerated(pipe, "fbcache", **opts):
        torch.manual_seed(0)
        out = pipe(**kw).images
        tl = pipe.dcache.stats()["timeline"]
    cached = [[e["step"] for e in tl if e["branch"] == b and "reused" in e["sites"].values()]
              for b in range(cfg_branches)]
    return out, cached


# Each case exercises one of DBCache's checks; thresholds sit inside the tiny model's range of
# distances (0.15-0.4) so that both branches cache some steps and compute others.
FAST = [
    dict(threshold=0.3, warmup_steps=3),
    dict(threshold=0.3, warmup_steps=6, warmup_interval=2, max_consecutive=2),
]
SLOW = [
    dict(threshold=0.3, warmup_steps=2, max_cached_steps=3),
    dict(threshold=0.3, warmup_steps=8, steps_mask=[1, 1, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0]),
    dict(threshold=0.01, warmup_steps=8, steps_mask=[1, 1, 1, 0, 0, 1, 0, 0, 0, 1], steps_policy="static"),
    dict(threshold=0.35, fn_blocks=2, bn_blocks=1, warmup_steps=2),
]
CASES = FAST + [pytest.param(o, marks=pytest.mark.slow) for o in SLOW]


@pytest.mark.parametrize("cfg", [False, True], ids=["one-call", "two-call-cfg"])
@pytest.mark.parametrize("opts", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items() if k != "steps_mask"))
def test_same_steps_as_cache_dit(opts, cfg):
    import tiny

    logging.getLogger("cache_dit").setLevel(logging.ERROR)
    pipe, kw, _, _ = tiny.flux(cfg=cfg)
    kw = dict(kw, num_inference_steps=STEPS)
    branches = 2 if cfg else 1
    ref_out, ref_cached = _run_cache_dit(pipe, kw, branches, **opts)
    out, cached = _run_dcache(pipe, kw, branches, **opts)
    assert all(ref_cached), "cache-dit cached nothing on a branch: the case does not exercise the decision"
    assert cached == ref_cached
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)


def test_bad_mask_and_policy_are_clear_errors(tiny_pipes):
    pipe = tiny_pipes("flux")[0]
    with pytest.raises(ValueError, match="steps_mask must be a non-empty list of 0 and 1"):
        dcache.accelerate(pipe, "fbcache", steps_mask=[1, 2])
    with pytest.raises(ValueError, match=r"steps_policy must be one of \('dynamic', 'static'\)"):
        dcache.accelerate(pipe, "fbcache", steps_policy="fast")
    with pytest.raises(ValueError, match="warmup_interval must be in"):
        dcache.accelerate(pipe, "fbcache", warmup_interval=0)
