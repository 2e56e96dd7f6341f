"""Draw scenes: 8x supersampled with opencv, then area-averaged to 32x32 (anti-aliased edges)."""
from __future__ import annotations

import random

import cv2
import numpy as np

from .grammar import BACKGROUNDS, IMAGE_SIZE, OBJECT_COLOURS, Placed, Scene, layout, random_scene

SUPERSAMPLE = 8


def render(placed: list[Placed], background: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) float32 RGB in [0, 1]."""
    k = SUPERSAMPLE
    canvas = np.empty((size * k, size * k, 3), np.float32)
    canvas[:] = BACKGROUNDS[background]
    for p in placed:
        colour = tuple(float(c) for c in OBJECT_COLOURS[p.obj.colour])
        x0, y0, s = p.x * k, p.y * k, p.side * k
        if p.obj.shape == "square":
            cv2.rectangle(canvas, (x0, y0), (x0 + s - 1, y0 + s - 1), colour, thickness=-1)
        elif p.obj.shape == "circle":
            cv2.circle(canvas, (x0 + s // 2, y0 + s // 2), s // 2, colour, thickness=-1)
        else:  # upright isosceles triangle filling its box
            pts = np.array([[x0, y0 + s - 1], [x0 + s - 1, y0 + s - 1], [x0 + s // 2, y0]], np.int32)
            cv2.fillPoly(canvas, [pts], colour)
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)


def render_scene(scene: Scene, rng: random.Random) -> tuple[np.ndarray, list[Placed]]:
    placed = layout(scene, rng)
    return render(placed, scene.background), placed


def sample_batch(n: int, rng: random.Random) -> tuple[np.ndarray, list[str]]:
    """``n`` random scenes: images (n, 32, 32, 3) float32 in [0, 1] and their prompts."""
    images, prompts = [], []
    for _ in range(n):
        scene = random_scene(rng)
        image, _ = render_scene(scene, rng)
        images.append(image)
        prompts.append(scene.prompt())
    return np.stack(images), prompts
