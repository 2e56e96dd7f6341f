"""The shipped reference digits pipeline: offline loading, outputs, guidance, errors, cache hooks."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest
import torch

from dcache.pipelines.zoo import FluxDigitsPipeline, load_digit_classifier, load_digit_images, load_reference_pipeline

STEPS = 4


@pytest.fixture(scope="module")
def pipe() -> FluxDigitsPipeline:
    torch.set_num_threads(1)
    p = load_reference_pipeline(device="cpu", dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, labels=(3, 7), seed=0, steps=STEPS, **kw):
    kw.setdefault("output_type", "pt")
    return pipe(class_labels=list(labels), num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kw).images


def test_output_types_shapes_and_ranges(pipe):
    pil = run(pipe, output_type="pil")
    assert isinstance(pil, list) and len(pil) == 2
    assert all(isinstance(im, PIL.Image.Image) and im.size == (32, 32) and im.mode == "L" for im in pil)
    arr = run(pipe, output_type="np")
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 32, 32, 1) and arr.dtype == np.float32
    pt = run(pipe, output_type="pt")
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 1, 32, 32) and pt.dtype == torch.float32
    assert 0.0 <= float(pt.min()) and float(pt.max()) <= 1.0
    # The three views are the same images.
    np.testing.assert_allclose(arr[..., 0], pt[:, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(pil[0], dtype=np.float32) / 255.0, arr[0, ..., 0], atol=1 / 255 + 1e-6)


def test_return_dict_false_and_single_int_label(pipe):
    out = pipe(class_labels=5, num_inference_steps=2, output_type="pt", return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 1, 32, 32)


def test_same_seed_same_output_different_seed_differs(pipe):
    a, b = run(pipe, seed=1), run(pipe, seed=1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, run(pipe, seed=2), atol=1e-3)


def test_cfg_runs_two_branches_and_changes_output(pipe):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(pipe.current_timestep), with_kwargs=True)
    try:
        guided = run(pipe, guidance_scale=4.0)
        n_guided = len(calls)
        calls.clear()
        plain = run(pipe, guidance_scale=1.0)
        n_plain = len(calls)
    finally:
        handle.remove()
    assert n_guided == 2 * STEPS and n_plain == STEPS
    assert all(t is not None for t in calls)  # current_timestep is set inside the loop...
    assert pipe.current_timestep is None  # ...and cleared after it
    assert (guided - plain).abs().max() > 0.05


def test_bigger_batch_matches_per_image_generation(pipe):
    both = pipe(class_labels=[2, 6], num_inference_steps=3, output_type="pt",
                generator=[torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]).images
    second = pipe(class_labels=[6], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(11)).images
    torch.testing.assert_close(both[1:], second, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_labels=[10]), r"\[0, 9\]"),
        (dict(class_labels=[-1]), r"\[0, 9\]"),
        (dict(class_labels=["3"]), r"\[0, 9\]"),
        (dict(class_labels=[]), r"\[0, 9\]"),
        (dict(class_labels=[1], height=31), "positive even integer"),
        (dict(class_labels=[1], width=0), "positive even integer"),
        (dict(class_labels=[1], output_type="latent"), r"\('pil', 'np', 'pt'\)"),
        (dict(class_labels=[1], num_inference_steps=0), ">= 1"),
        (dict(class_labels=[1], guidance_scale=-1.0), ">= 0"),
        (dict(class_labels=[1], latents=torch.zeros(1, 10, 4)), r"\(1, 256, 4\)"),
    ],
)
def test_bad_input_names_accepted_values(pipe, kwargs, match):
    kwargs.setdefault("num_inference_steps", 1)
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_diffusers_taylorseer_hooks_work_per_branch(pipe):
    """diffusers' TaylorSeer needs cache_context on every call; it must run and skip attention calls."""
    from diffusers import TaylorSeerCacheConfig

    attn = pipe.transformer.transformer_blocks[0].attn
    counter = {"n": 0}
    handle = attn.processor  # count real attention computations through the processor
    orig_call = type(handle).__call__

    class Counting(type(handle)):
        def __call__(self, *a, **k):
            counter["n"] += 1
            return orig_call(self, *a, **k)

    attn.set_processor(Counting())
    try:
        base = run(pipe, steps=12, guidance_scale=4.0)
        n_base = counter["n"]
        counter["n"] = 0
        pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=4, disable_cache_before_step=2))
        try:
            cached = run(pipe, steps=12, guidance_scale=4.0)
        finally:
            pipe.transformer.disable_cache()
        n_cached = counter["n"]
    finally:
        attn.set_processor(handle)
    assert n_base == 24
    assert n_cached < n_base / 2
    assert (cached - base).abs().mean() < 0.1
    torch.testing.assert_close(run(pipe, steps=12, guidance_scale=4.0), base)  # disable restores exact output


def test_classifier_reads_held_out_real_digits():
    images, labels = load_digit_images(32, split="test")
    clf = load_digit_classifier()
    acc = (clf.score(images) == labels).float().mean().item()
    assert acc > 0.95
    # Every input form the pipeline returns gives the same predictions.
    sub = images[:8]
    as_np = sub.permute(0, 2, 3, 1).numpy()
    as_pil = [PIL.Image.fromarray((im[..., 0] * 255).round().astype(np.uint8), mode="L") for im in as_np]
    assert torch.equal(clf.score(sub), clf.score(as_np))
    assert torch.equal(clf.score(sub), clf.score(as_pil))


def test_classifier_rejects_unknown_input():
    with pytest.raises(ValueError, match="PIL images, a numpy array or a torch tensor"):
        load_digit_classifier().score("not images")


@pytest.mark.slow
def test_samples_at_50_steps_with_cfg_are_the_right_digits(pipe):
    labels = [d for d in range(10) for _ in range(5)]
    images = pipe(class_labels=labels, num_inference_steps=50, guidance_scale=4.0, output_type="pt",
                  generator=torch.Generator().manual_seed(1234)).images
    acc = (load_digit_classifier().score(images) == torch.tensor(labels)).float().mean().item()
    assert acc >= 0.9
