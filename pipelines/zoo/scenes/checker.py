"""An exact attribute checker for scene images, on opencv.

Per image: the background is the nearest background colour to the median border pixel. An object
of colour C is the largest connected component of pixels that are a mixture of the background and
C with C's share above one half (so an anti-aliased edge counts where it is at least half covered)
and little colour off that line. Its shape comes from the contour's fill of its bounding box
(square ~1, circle ~pi/4, triangle ~1/2), its size from the box's extent, its position from the
component's centroid. ``count`` fails when any colour has more (or other) sizeable blobs than the
prompt names.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from .grammar import BACKGROUNDS, OBJECT_COLOURS, SIZE_THRESHOLD, Scene, parse_prompt, relation_holds

MIN_AREA = 8  # pixels; the smallest object (a 7-pixel triangle) covers about 24
MAX_OFF_LINE = 0.3  # RGB distance from the background-to-colour line still accepted as that colour
FILL_TRIANGLE_BELOW = 0.64  # between 1/2 (triangle) and pi/4 (circle)
FILL_SQUARE_ABOVE = 0.89  # between pi/4 (circle) and 1 (square)


def _as_hwc(images) -> np.ndarray:
    """Tensor (N,3,H,W) / array (N,H,W,3) in [0,1] / list of PIL images -> float32 (N,H,W,3)."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu().numpy()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensors must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    if isinstance(images, np.ndarray):
        x = images.astype(np.float32)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"image arrays must be (N, H, W, 3) in [0, 1], got shape {images.shape}")
        return x
    if isinstance(images, Sequence):
        return np.stack([np.asarray(im.convert("RGB"), np.float32) / 255.0 for im in images])
    raise ValueError(f"images must be a tensor (N,3,H,W), an array (N,H,W,3) or a list of PIL images, got {type(images).__name__}")


def _background(img: np.ndarray) -> str:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    median = np.median(border, axis=0)
    return min(BACKGROUNDS, key=lambda n: float(np.linalg.norm(median - np.array(BACKGROUNDS[n]))))


def colour_mask(img: np.ndarray, colour: str, background: str) -> np.ndarray:
    """uint8 mask of pixels that are more ``colour`` than ``background`` along the line between them."""
    b = np.array(BACKGROUNDS[background], np.float32)
    c = np.array(OBJECT_COLOURS[colour], np.float32)
    d = c - b
    alpha = ((img - b) @ d) / float(d @ d)
    off = np.linalg.norm(img - b - alpha[..., None] * d, axis=-1)
    return ((alpha > 0.5) & (off < MAX_OFF_LINE)).astype(np.uint8)


def _blobs(mask: np.ndarray) -> list[dict]:
    """Connected components of at least MIN_AREA pixels, largest first."""
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    out = []
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] >= MIN_AREA:
            out.append({"mask": (labels == i).astype(np.uint8), "area": int(stats[i, cv2.CC_STAT_AREA]),
                        "centroid": (float(centroids[i][0]), float(centroids[i][1]))})
    return sorted(out, key=lambda b: -b["area"])


def classify_blob(blob: dict) -> tuple[str, str]:
    """(shape, size) of a component from its outer contour."""
    contours, _ = cv2.findContours(blob["mask"], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea))
    fill = blob["area"] / float(w * h)
    shape = "triangle" if fill < FILL_TRIANGLE_BELOW else "square" if fill > FILL_SQUARE_ABOVE else "circle"
    return shape, "big" if max(w, h) > SIZE_THRESHOLD else "small"


def check_image(img: np.ndarray, scene: Scene) -> dict:
    background = _background(img)
    found_bg = background == scene.background
    per_colour = {c: _blobs(colour_mask(img, c, scene.background)) for c in OBJECT_COLOURS}
    objects, centres = [], []
    for obj in scene.objects:
        blobs = per_colour[obj.colour]
        if not blobs:
            objects.append({"colour": False, "shape": False, "size": False, "detected": None})
            centres.append(None)
            continue
        shape, size = classify_blob(blobs[0])
        objects.append({"colour": True, "shape": shape == obj.shape, "size": size == obj.size,
                        "detected": {"shape": shape, "size": size, "centroid": blobs[0]["centroid"],
                                     "area": blobs[0]["area"]}})
        centres.append(blobs[0]["centroid"])
    named = [o.colour for o in scene.objects]
    count = all(len(per_colour[c]) == named.count(c) for c in OBJECT_COLOURS)
    relation = None
    if scene.relation is not None:
        relation = None not in centres and relation_holds(scene.relation, centres[0], centres[1])
    whole = (found_bg and count and relation is not False
             and all(o["colour"] and o["shape"] and o["size"] for o in objects))
    return {"background": found_bg, "count": count, "relation": relation, "objects": objects, "whole": bool(whole)}


def check_adherence(images, prompts: Sequence[str]) -> list[dict]:
    """Per image, does it show what its prompt says?

    images: tensor (N, 3, H, W) or array (N, H, W, 3) in [0, 1], or a list of PIL images.
    prompts: N prompts of the scene grammar (a ValueError names the grammar otherwise).

    Returns one dict per image: ``background``, ``count`` (no missing or extra blobs),
    ``relation`` (None for one object), ``objects`` (per named object: ``colour`` (found),
    ``shape``, ``size`` booleans and what was ``detected``), and ``whole`` (all of them).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    scenes = [parse_prompt(p) for p in prompts]
    x = _as_hwc(images)
    if len(x) != len(scenes):
        raise ValueError(f"got {len(x)} images for {len(scenes)} prompts")
    return [dict(check_image(img, scene), prompt=p) for img, scene, p in zip(x, scenes, prompts)]


def adherence_rate(results: list[dict]) -> float:
    """Fraction of images whose whole prompt is satisfied."""
    return sum(r["whole"] for r in results) / max(1, len(results))
