"""Adapter facts from the issue's failure list, end to end in a real pipeline: Wan's published
TeaCache coefficients come with the warm-up their source pairs them with (5 steps for the
ret-steps sets), an explicit `warmup_steps` wins, and an unrecognised checkpoint warms up 1 step.
(The clamping of a negative rescaled distance is checked against a hand accumulator in
test_math.py.)"""

import pytest
import torch

import dcache


@pytest.mark.parametrize("name, options, warmup", [
    ("/models/Wan2.1-T2V-1.3B-Diffusers", {}, 5),
    ("/models/Wan2.1-T2V-1.3B-Diffusers", {"warmup_steps": 2}, 2),
    ("", {"coefficients": [1.0, 0.0]}, 1),
])
def test_wan_teacache_warmup_pairs_with_its_coefficients(name, options, warmup, tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("wan")
    steps = 8
    saved = getattr(pipe.transformer.config, "_name_or_path", "")
    pipe.transformer.config._name_or_path = name
    try:
        # An unreachable threshold: every step after the warm-up reuses, the last computes.
        with dcache.accelerated(pipe, "teacache", threshold=1e9, compute_last=True, **options):
            pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=steps, **kw)
            stats = pipe.dcache.stats()
    finally:
        pipe.transformer.config._name_or_path = saved
    site = "blocks[0:3]"
    for branch in (0, 1):
        kinds = [e["sites"][site] for e in stats["timeline"] if e["branch"] == branch]
        assert kinds == ["computed"] * warmup + ["reused"] * (steps - warmup - 1) + ["computed"], (branch, kinds)
