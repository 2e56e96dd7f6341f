"""The scene grammar, renderer and attribute checker, against the generator's own ground truth."""
import random
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch

from dcache.pipelines.zoo.scenes import VOCABULARY, check_adherence, parse_prompt, sample_prompts
from dcache.pipelines.zoo.scenes.grammar import BACKGROUNDS, OBJECT_COLOURS, SHAPES, Placed, Scene, SceneObject, layout
from dcache.pipelines.zoo.scenes.render import render, sample_batch


def test_checker_reads_ground_truth_scenes():
    images, prompts = sample_batch(600, random.Random(7))
    results = check_adherence(images, prompts)
    assert sum(r["whole"] for r in results) / len(results) >= 0.98
    two = [r for r in results if r["relation"] is not None]
    assert len(two) > 300 and sum(r["relation"] for r in two) / len(two) >= 0.98


def _scene(prompt: str, seed: int = 0) -> tuple[Scene, list[Placed]]:
    scene = parse_prompt(prompt)
    return scene, layout(scene, random.Random(seed))


def _check_one(placed: list[Placed], background: str, prompt: str) -> dict:
    return check_adherence(render(placed, background)[None], [prompt])[0]


PROMPT = "a big red circle left of a small blue square on a black background"


@pytest.mark.parametrize("seed", range(5))
def test_each_wrong_attribute_is_caught(seed):
    scene, placed = _scene(PROMPT, seed)
    assert _check_one(placed, scene.background, PROMPT)["whole"]
    a, b = placed
    # The wrong shape, size, colour, background: the matching boolean and "whole" fail, the rest hold.
    wrong_shape = [replace(a, obj=replace(a.obj, shape="triangle")), b]
    r = _check_one(wrong_shape, "black", PROMPT)
    assert r["objects"][0]["shape"] is False and r["objects"][0]["colour"] and r["objects"][1]["shape"] and not r["whole"]
    small_a = [replace(a, obj=replace(a.obj, size="small"), side=7), b]
    r = _check_one(small_a, "black", PROMPT)
    assert r["objects"][0]["size"] is False and r["objects"][0]["shape"] and not r["whole"]
    green_b = [a, replace(b, obj=replace(b.obj, colour="green"))]
    r = _check_one(green_b, "black", PROMPT)
    assert r["objects"][1]["colour"] is False and r["count"] is False and not r["whole"]
    r = _check_one(placed, "white", PROMPT)
    assert r["background"] is False and not r["whole"]
    # Swapping the two boxes breaks the relation only.
    swapped = [replace(a, x=b.x + b.side // 2 - a.side // 2), replace(b, x=a.x + a.side // 2 - b.side // 2)]
    r = _check_one(swapped, "black", PROMPT)
    if abs(swapped[0].centre[0] - swapped[1].centre[0]) > 1:  # clipped swaps can land on top of each other
        assert r["relation"] is False and not r["whole"]
    # A missing object and an extra one.
    r = _check_one([a], "black", PROMPT)
    assert r["objects"][1]["colour"] is False and r["relation"] is False and not r["whole"]
    r = _check_one(placed, "black", "a big red circle on a black background")
    assert r["count"] is False and not r["whole"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size, side", [("small", 7), ("big", 13)])
def test_every_shape_colour_and_background_is_read(shape, size, side):
    for colour in OBJECT_COLOURS:
        for background in BACKGROUNDS:
            prompt = f"a {size} {colour} {shape} on a {background} background"
            placed = [Placed(SceneObject(size, colour, shape), 9, 10, side)]
            r = _check_one(placed, background, prompt)
            assert r["whole"], (prompt, r)


def test_input_forms_agree():
    images, prompts = sample_batch(12, random.Random(3))
    as_pt = torch.from_numpy(images).permute(0, 3, 1, 2)
    as_pil = [PIL.Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
    wholes = [[r["whole"] for r in check_adherence(x, prompts)] for x in (images, as_pt, as_pil)]
    assert wholes[0] == wholes[1] == wholes[2]
    # Flat noise satisfies nothing.
    noise = torch.rand(12, 3, 32, 32)
    assert not any(r["whole"] for r in check_adherence(noise, prompts))


def test_sample_prompts_deterministic_parseable_and_cover_the_vocabulary():
    a, b = sample_prompts(400, seed=1), sample_prompts(400, seed=1)
    assert a == b and a != sample_prompts(400, seed=2)
    scenes = [parse_prompt(p) for p in a]
    assert all(s.prompt() == p for s, p in zip(scenes, a))
    assert {w for p in a for w in p.split()} == set(VOCABULARY)
    assert 0 < sum(len(s.objects) == 1 for s in scenes) < len(scenes)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("", "empty"),
        ("a big purple circle on a black background", "unknown word"),
        ("a big red circle on a black background " + "a " * 10, "at most 16"),
        ("a red big circle on a black background", "SIZE COLOUR SHAPE"),
        ("a big red circle left of a big red square on a gray background", "different colours"),
        ("a big red circle", "BACKGROUND background"),
    ],
)
def test_bad_prompts_name_the_vocabulary(prompt, match):
    with pytest.raises(ValueError, match=match) as err:
        check_adherence(torch.zeros(1, 3, 32, 32), [prompt])
    assert "vocabulary: a on background small big red" in str(err.value)


def test_mismatched_lengths_and_shapes_are_refused():
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        check_adherence(torch.zeros(2, 3, 32, 32), ["a big red circle on a black background"])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        check_adherence(torch.zeros(1, 1, 32, 32), ["a big red circle on a black background"])
