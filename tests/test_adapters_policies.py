"""Every adapter × every policy on a real tiny diffusers pipeline.

For each pair: output finite and of the baseline's shape; calls into an inner layer of the last
block drop as the policy says (hooks on the skipped block itself would still fire, so the count is
taken on its attention's ``to_q``); ``none`` and ``disable`` are bitwise identical to the plain
pipeline; two runs in a row are identical (no state leaks).
"""

import pytest
import torch

import dcache

STEPS = 8
FAMILIES = ["flux", "sd3", "pixart", "dit", "wan", "cogvideox", "hunyuan_video", "ltx", "qwenimage", "sd_unet"]
# The adapters with a transformer block chain (policies that hook blocks run on these).
BLOCK_FAMILIES = [f for f in FAMILIES if f != "sd_unet"]
# Options chosen so every policy skips on these random models.
POLICIES = {
    "none": {},
    "static": {"interval": 2},
    "teacache": {"threshold": 1e6, "coefficients": [1.0, 0.0]},
    "fbcache": {"threshold": 1e6},
    "taylorseer": {"interval": 3, "warmup_steps": 1},
}
BLOCK_ONLY = {"fbcache", "taylorseer"}


class CallCounter:
    def __init__(self, module):
        self.n = 0
        self.h = module.register_forward_hook(self._hook)

    def _hook(self, *a):
        self.n += 1

    def remove(self):
        self.h.remove()


def run(pipe, kw, attr, steps=STEPS):
    return getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=steps, **kw), attr)


@pytest.fixture(scope="module")
def baselines(tiny_pipes):
    cache = {}

    def get(name):
        if name not in cache:
            pipe, kw, attr, inner = tiny_pipes(name)
            c = CallCounter(inner)
            out = run(pipe, kw, attr)
            c.remove()
            cache[name] = (out, c.n)
        return cache[name]

    return get


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("family", FAMILIES)
def test_policy_on_family(family, policy, tiny_pipes, baselines):
    pipe, kw, attr, inner = tiny_pipes(family)
    base, base_calls = baselines(family)
    if family == "sd_unet" and policy in BLOCK_ONLY:
        with pytest.raises(ValueError, match="step-level|none, static, teacache"):
            dcache.accelerate(pipe, policy, **POLICIES[policy])
        assert "dcache" not in pipe.__dict__ and type(pipe).__name__ == "StableDiffusionPipeline"
        assert torch.equal(run(pipe, kw, attr), base)
        return
    dcache.accelerate(pipe, policy, **POLICIES[policy])
    try:
        counter = CallCounter(inner)
        out1 = run(pipe, kw, attr)
        calls = counter.n
        counter.remove()
        stats = pipe.dcache.stats()
        out2 = run(pipe, kw, attr)
    finally:
        dcache.disable(pipe)
    assert out1.shape == base.shape
    assert torch.isfinite(out1).all()
    assert torch.equal(out1, out2), "second run differs: state leaked between runs"
    assert stats["steps"] == STEPS
    if policy == "none":
        assert torch.equal(out1, base)
        assert calls == base_calls
        assert stats["reused"] == stats["forecast"] == 0
    else:
        assert calls < base_calls, f"{policy} did not skip the inner layers ({calls} of {base_calls} calls)"
        assert stats["reused"] + stats["forecast"] > 0
        assert 0 < stats["flops_avoided_fraction"] < 1
    # `none` never reuses, so it caches nothing; every other policy held tensors during the run.
    assert stats["cache_bytes"] == 0 and (stats["peak_cache_bytes"] == 0) == (policy == "none")
    assert torch.equal(run(pipe, kw, attr), base), "disable did not restore the exact original"
