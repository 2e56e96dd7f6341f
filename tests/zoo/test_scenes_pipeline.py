"""The shipped scenes pipeline: offline loading, outputs, seeds, guidance, round trip, errors, caching."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

import dcache
from dcache.pipelines.zoo.scenes import (
    FluxScenesPipeline,
    adherence_rate,
    check_adherence,
    load_scenes_pipeline,
    sample_prompts,
    save_scenes_pipeline,
)
from dcache.pipelines.zoo.scenes.model import image_ids, pack, unpack

STEPS = 4
PROMPTS = ["a big red circle left of a small blue square on a black background",
           "a small yellow triangle on a white background"]


@pytest.fixture(scope="module")
def pipe() -> FluxScenesPipeline:
    torch.set_num_threads(1)
    p = load_scenes_pipeline(device="cpu", dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, prompts=PROMPTS, seed=0, steps=STEPS, **kw):
    kw.setdefault("output_type", "pt")
    return pipe(list(prompts), num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kw).images


def test_components_are_real_diffusers_classes(pipe):
    assert isinstance(pipe, DiffusionPipeline)
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    n = sum(p.numel() for p in pipe.transformer.parameters()) + sum(p.numel() for p in pipe.text_encoder.parameters())
    assert 1e6 < n < 5e6  # "a few MB" of float16 weights


def test_output_types_shapes_and_ranges(pipe):
    pil = run(pipe, output_type="pil")
    assert len(pil) == 2 and all(isinstance(im, PIL.Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in pil)
    arr = run(pipe, output_type="np")
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 32, 32, 3) and arr.dtype == np.float32
    pt = run(pipe, output_type="pt")
    assert pt.shape == (2, 3, 32, 32) and pt.dtype == torch.float32 and 0 <= float(pt.min()) <= float(pt.max()) <= 1
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(pil[1], dtype=np.float32) / 255.0, arr[1], atol=1 / 255 + 1e-6)
    single = pipe(PROMPTS[1], num_inference_steps=2, output_type="pt", return_dict=False)
    assert isinstance(single, tuple) and single[0].shape == (1, 3, 32, 32)


def test_same_seed_same_output_different_seed_differs(pipe):
    assert torch.equal(run(pipe, seed=1), run(pipe, seed=1))
    assert not torch.allclose(run(pipe, seed=1), run(pipe, seed=2), atol=1e-3)


def _manual_sample(pipe, prompts, x, steps, guidance, step_noise=None):
    """An independent loop over the same modules from packed noise ``x``: Euler,
    x <- x + (sigma_next - sigma) * v, or with ``step_noise`` (a callable giving fresh noise) the
    re-noising step, x0 = x - sigma * v, then x <- (1 - sigma_next) x0 + sigma_next z."""
    tok, size, patch = pipe.tokenizer, 32, 4
    cond = pipe.text_encoder(tok(prompts))
    uncond = pipe.text_encoder(tok.null(len(prompts)))
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(steps)
    kw = dict(img_ids=image_ids(size, size, patch), txt_ids=tok.positions(), return_dict=False)
    for i in range(steps):
        sigma, nxt = sched.sigmas[i], sched.sigmas[i + 1]
        t = sigma.expand(len(prompts))
        v = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond[0], pooled_projections=cond[1], **kw)[0]
        if guidance > 1:
            u = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=uncond[0],
                                 pooled_projections=uncond[1], **kw)[0]
            v = u + guidance * (v - u)
        x = x + (nxt - sigma) * v if step_noise is None else (1 - nxt) * (x - sigma * v) + nxt * step_noise()
    return ((unpack(x, size, size, patch) + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampling_matches_an_independent_euler_loop_with_and_without_cfg(pipe, guidance):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(pipe.current_timestep), with_kwargs=True)
    try:
        got = run(pipe, guidance_scale=guidance, seed=3)
    finally:
        handle.remove()
    assert len(calls) == (2 if guidance > 1 else 1) * STEPS and pipe.current_timestep is None
    with torch.no_grad():
        x = pack(torch.randn((len(PROMPTS), 3, 32, 32), generator=torch.Generator().manual_seed(3)), 4)
        want = _manual_sample(pipe, PROMPTS, x, STEPS, guidance)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def stochastic() -> FluxScenesPipeline:
    p = load_scenes_pipeline(stochastic_sampling=True)
    p.set_progress_bar_config(disable=True)
    return p


def test_stochastic_sampling_matches_an_independent_loop_and_repeats_per_seed(pipe, stochastic):
    assert stochastic.scheduler.config.stochastic_sampling and not pipe.scheduler.config.stochastic_sampling
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]
    got = stochastic(PROMPTS, num_inference_steps=STEPS, generator=gens(), output_type="pt").images
    # Each image's generator gives its starting noise, then its noise for every step.
    g = gens()
    draw = lambda shape: torch.cat([torch.randn((1,) + shape, generator=one) for one in g])
    with torch.no_grad():
        want = _manual_sample(stochastic, PROMPTS, pack(draw((3, 32, 32)), 4), STEPS, 4.0,
                              step_noise=lambda: draw((64, 48)))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # The step noise comes from the caller's generators: the same seeds repeat, a batch equals its
    # images made one by one, and the result is not the Euler one.
    again = stochastic(PROMPTS, num_inference_steps=STEPS, generator=gens(), output_type="pt").images
    assert torch.equal(got, again)
    second = stochastic(PROMPTS[1:], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(6),
                        output_type="pt").images
    torch.testing.assert_close(got[1:], second, atol=1e-4, rtol=0)
    euler = pipe(PROMPTS, num_inference_steps=STEPS, generator=gens(), output_type="pt").images
    assert (got - euler).abs().max() > 0.05


def test_guidance_changes_the_output(pipe):
    assert (run(pipe, guidance_scale=4.0) - run(pipe, guidance_scale=1.0)).abs().max() > 0.05


def test_bigger_batch_matches_per_image_generation(pipe):
    both = pipe(PROMPTS, num_inference_steps=3, output_type="pt",
                generator=[torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]).images
    second = pipe(PROMPTS[1:], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(11)).images
    torch.testing.assert_close(both[1:], second, atol=1e-4, rtol=0)


def test_save_load_round_trip_gives_identical_outputs(pipe, tmp_path):
    save_scenes_pipeline(pipe, tmp_path / "copy")
    again = load_scenes_pipeline(weights_dir=tmp_path / "copy")
    again.set_progress_bar_config(disable=True)
    assert torch.equal(run(pipe, guidance_scale=4.0), run(again, guidance_scale=4.0))
    with pytest.raises(ValueError, match="has no scenes_model.json"):
        load_scenes_pipeline(weights_dir=tmp_path / "missing")


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("a big purple circle on a black background", r"unknown word\(s\) \['purple'\]"),
        ("a big red circle on a black background " + "on " * 9, "at most 16"),
        ("a circle big red on a black background", "SIZE COLOUR SHAPE"),
    ],
)
def test_bad_prompts_fail_before_any_model_call_and_name_the_vocabulary(pipe, prompt, match):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match) as err:
            pipe([PROMPTS[0], prompt], num_inference_steps=STEPS)
    finally:
        handle.remove()
    assert "vocabulary: a on background small big red green blue yellow circle square triangle" in str(err.value)
    assert calls == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=[]), "non-empty list of strings"),
        (dict(prompt=3), "non-empty list of strings"),
        (dict(output_type="latent"), r"\('pil', 'np', 'pt'\)"),
        (dict(num_inference_steps=0), ">= 1"),
        (dict(guidance_scale=-1.0), ">= 0"),
        (dict(latents=torch.zeros(1, 10, 48)), r"\(1, 64, 48\)"),
    ],
)
def test_bad_arguments_name_accepted_values(pipe, kwargs, match):
    kwargs.setdefault("prompt", PROMPTS[1])
    kwargs.setdefault("num_inference_steps", 1)
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_diffusers_first_block_cache_runs_per_branch(pipe):
    from diffusers import FirstBlockCacheConfig

    base = run(pipe, steps=8, guidance_scale=4.0)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    try:
        cached = run(pipe, steps=8, guidance_scale=4.0)
    finally:
        pipe.transformer.disable_cache()
    assert (cached - base).abs().mean() < 0.1
    torch.testing.assert_close(run(pipe, steps=8, guidance_scale=4.0), base)


# The ground can fail: at 20 steps, a static cache that computes 3 of them (steps 0, 10 and the
# last) must lose at least 20 points of whole-prompt adherence (issue 16's bar for the bench's
# aggressive setting) and clearly more of the attribute rate than one that computes every other
# step. Measured on the shipped (leg-7) weights: whole 0.79 baseline, 0.96 static(interval=2),
# 0.38 static(interval=10); attribute rate 0.97 / 0.99 / 0.88 (leg 6: whole 0.96 / 0.92 / 0.46).
ABLATION_PROMPTS, ABLATION_STEPS = 24, 20


def _rates(pipe, prompts, policy=None, **opts):
    from dcache.eval.bench_image import attribute_rate

    if policy is not None:
        dcache.accelerate(pipe, policy, **opts)
    try:
        images = pipe(prompts, num_inference_steps=ABLATION_STEPS, guidance_scale=4.0, output_type="pt",
                      generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images
    finally:
        if policy is not None:
            dcache.disable(pipe)
    results = check_adherence(images, prompts)
    return adherence_rate(results), attribute_rate(results)


def test_aggressive_cache_loses_adherence_mild_cache_less(pipe):
    prompts = sample_prompts(ABLATION_PROMPTS, seed=99)
    base_whole, base = _rates(pipe, prompts)
    _, mild = _rates(pipe, prompts, "static", interval=2)
    aggressive_whole, aggressive = _rates(pipe, prompts, "static", interval=10)
    assert base_whole >= 0.6 and base >= 0.9, (base_whole, base)
    assert base_whole - aggressive_whole >= 0.2, (base_whole, aggressive_whole)
    assert base - aggressive >= 0.05 and mild - aggressive >= 0.05, (base, mild, aggressive)


@pytest.mark.slow
def test_baseline_samples_at_50_steps_get_colours_and_backgrounds_right(pipe):
    """What the shipped model has learned (leg 7 measured whole 0.91, shape 0.95, every other rate 1.00 on
    exactly these prompts and seeds; leg 6 0.85 / 0.91, leg 5 0.89 / 0.94; see pipelines/zoo/README.md)."""
    from dcache.pipelines.zoo.scenes.evaluate import summarise

    prompts = sample_prompts(100, seed=2024)
    images = pipe(prompts, num_inference_steps=50, guidance_scale=4.0, output_type="pt",
                  generator=[torch.Generator().manual_seed(i) for i in range(100)]).images
    rates = summarise(check_adherence(images, prompts))
    assert rates["background"] >= 0.95 and rates["colour"] >= 0.95 and rates["relation"] >= 0.95, rates
    assert rates["size"] >= 0.95 and rates["shape"] >= 0.92 and rates["whole"] >= 0.88, rates
