"""Per-sample decisions: a batch of two decided row by row equals the two samples run alone.

The second prompt is scaled so that its first-block residual moves differently: the single runs
take different decisions, so the batched run must compute some rows and reuse others."""

import pytest
import torch

import dcache


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy, options", [
    ("fbcache", {"threshold": 0.3}),
    ("teacache", {"threshold": 0.15, "coefficients": [1.0, 0.0]}),
])
def test_per_sample_batch_equals_single_runs(policy, options, tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    kw = {k: v for k, v in kw.items() if k not in ("prompt_embeds", "pooled_prompt_embeds")}
    torch.manual_seed(3)
    pe, pp = torch.randn(2, 8, 32), torch.randn(2, 32)
    pe[1] *= 20.0
    pp[1] *= 20.0
    with dcache.accelerated(pipe, policy, per_sample=True, **options):
        both = getattr(pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, generator=[gen(1), gen(2)],
                            num_inference_steps=8, **kw), attr)
        batched = pipe.dcache.stats()
    singles, kinds = [], []
    for i in range(2):
        with dcache.accelerated(pipe, policy, **options):
            singles.append(getattr(pipe(prompt_embeds=pe[i:i + 1], pooled_prompt_embeds=pp[i:i + 1],
                                        generator=gen(i + 1), num_inference_steps=8, **kw), attr))
            kinds.append([e["sites"]["blocks[1:4]" if policy == "fbcache" else "blocks[0:4]"]
                          for e in pipe.dcache.stats()["timeline"]])
    assert kinds[0] != kinds[1], "the samples took the same decisions: the mixed path is not exercised"
    for i in range(2):
        torch.testing.assert_close(both[i:i + 1], singles[i], atol=2e-6, rtol=1e-5)
    # FLOPs avoided: each row's reused steps, priced per row.
    reused = sum(k.count("reused") for k in kinds)
    assert 0 < batched["flops_avoided_fraction"] < 1 and reused > 0


def test_per_sample_is_off_by_default_and_validated(tiny_pipes):
    from dcache.schedulers.fbcache import FBCacheConfig
    from dcache.schedulers.teacache import TeaCacheConfig

    assert FBCacheConfig().per_sample is False and TeaCacheConfig().per_sample is False
    with pytest.raises(ValueError, match="per_sample must be True or False"):
        dcache.accelerate(tiny_pipes("flux")[0], "fbcache", per_sample="yes")
