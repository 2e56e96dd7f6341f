"""The occlusion world: a reference AR-video world where far history must be recalled.

Why this world: on a video whose frames can be predicted from the newest one or two frames, any
bounded cache that keeps the newest frames is as good as the full cache, and a KV-compression
method cannot show what it keeps. Here it cannot be, by construction:

* A handwritten sklearn digit (12x12, any class, a random sample) sits still at a random place of
  a 24x24 canvas, in front of a static rectangle outline.
* A full-width grey bar (height 6 or 10 px) slides up and down over everything at 1 or 2 px per
  frame, bouncing off the borders. Where it passes, the digit is hidden; when it moves on, the
  hidden rows reappear. What reappears was last visible 3-10 frames earlier (longer near the
  bounces, where a row is covered twice in a row), and **nothing in the prompt or in the recent
  frames says what it looked like**: the prompt gives only the bar's speed, height and initial
  direction, never the digit. A model (or cache) that forgets those frames must guess.
* The sink frame (frame 0) shows the background and the bar, not the digit: the digit drops in at
  frame 1. So a cache that keeps only the sink plus the newest frames has not seen the digit once
  the frames that showed it leave its window.
* Generation is image-to-video style: the first chunk (frames 0-2) is given from the ground truth
  (``ARVideoPipeline(..., context_frames=...)``), so the rest of the clip is determined and PSNR
  against ground truth is meaningful. The bar starts clear of the digit in frames 0-2.

There is no positional prior: when a row reappears depends on the bar's speed, height, position
and bounces, so "look k frames back" for a fixed k is not the rule; "look at the same place, the
last time it was not grey" is.

Pixels in [0, 1] map to [-1, 1]; the "latent" is the 2x space-to-depth of the frame
(4 x 12 x 12, 36 tokens per frame), as in :mod:`dcache.pipelines.ar_video.reference`.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.nn.functional as F

from dcache.pipelines.ar_video.reference import CANVAS, DIGIT, LATENT, TEXT_DIM, _digits

__all__ = ["SPEEDS", "HEIGHTS", "DIRECTIONS", "BAR_VALUE", "NAME", "make_batch", "prompt_embeds", "sample_prompts",
           "render", "occlusion_dir", "model_world", "load_occlusion"]

SPEEDS = (1, 2)
HEIGHTS = (6, 10)
DIRECTIONS = (-1, 1)
BAR_VALUE = 0.3
NAME = "arvideo_occlusion"
CONTEXT_FRAMES = 3  # the given first chunk


def occlusion_dir() -> str:
    import dcache.pipelines.zoo as zoo

    return os.path.join(os.path.dirname(zoo.__file__), NAME)


@lru_cache(maxsize=1)
def _text_table() -> torch.Tensor:
    g = torch.Generator().manual_seed(4321)
    return torch.randn(len(SPEEDS) + len(HEIGHTS) + len(DIRECTIONS), TEXT_DIM, generator=g)


def prompt_embeds(prompts) -> torch.Tensor:
    """[(speed, height, direction), ...] -> [B, 3, 32] text embeddings."""
    tab = _text_table()
    rows = []
    for p in prompts:
        try:
            speed, height, direction = (int(a) for a in p)
        except (TypeError, ValueError):
            raise ValueError(f"prompt must be (speed, height, direction), got {p!r}") from None
        if speed not in SPEEDS or height not in HEIGHTS or direction not in DIRECTIONS:
            raise ValueError(f"prompt must be (speed in {SPEEDS}, height in {HEIGHTS}, direction in {DIRECTIONS}), got {p!r}")
        i = (SPEEDS.index(speed), len(SPEEDS) + HEIGHTS.index(height), len(SPEEDS) + len(HEIGHTS) + DIRECTIONS.index(direction))
        rows.append(tab[list(i)])
    return torch.stack(rows)


def _bar_track(y0: int, v: int, n: int, hi: int) -> list[int]:
    out, y = [], y0
    for _ in range(n):
        out.append(y)
        y += v
        if y < 0 or y > hi:
            v = -v
            y = max(0, min(hi, y + 2 * v))
    return out


def render(digit: torch.Tensor, dx: int, dy: int, rect: tuple, speed: int, height: int, direction: int, y0: int, num_frames: int) -> torch.Tensor:
    """[F, CANVAS, CANVAS] pixels of one clip (see the module docstring)."""
    rx, ry, rw, rh = rect
    bg = torch.zeros(CANVAS, CANVAS)
    bg[ry : ry + rh, rx] = bg[ry : ry + rh, rx + rw - 1] = 0.5
    bg[ry, rx : rx + rw] = bg[ry + rh - 1, rx : rx + rw] = 0.5
    with_digit = bg.clone()
    with_digit[dy : dy + DIGIT, dx : dx + DIGIT] = torch.maximum(with_digit[dy : dy + DIGIT, dx : dx + DIGIT], digit)
    ys = _bar_track(y0, speed * direction, num_frames, CANVAS - height)
    out = torch.empty(num_frames, CANVAS, CANVAS)
    for f in range(num_frames):
        fr = (with_digit if f >= 1 else bg).clone()
        fr[ys[f] : ys[f] + height] = BAR_VALUE
        out[f] = fr
    return out


def _draw_clip(generator: torch.Generator, lo: int, hi: int, prompt=None):
    imgs, _ = _digits()
    i = int(torch.randint(lo, hi, (1,), generator=generator))
    if prompt is None:
        prompt = (SPEEDS[int(torch.randint(0, len(SPEEDS), (1,), generator=generator))],
                  HEIGHTS[int(torch.randint(0, len(HEIGHTS), (1,), generator=generator))],
                  DIRECTIONS[int(torch.randint(0, len(DIRECTIONS), (1,), generator=generator))])
    speed, height, direction = prompt
    dx, dy, rx, ry, rw, rh = (int(a) for a in torch.randint(0, CANVAS - DIGIT + 1, (6,), generator=generator))
    rw, rh = 4 + rw % 8, 4 + rh % 8
    rx, ry = min(rx, CANVAS - rw), min(ry, CANVAS - rh)
    # the bar starts clear of the digit for the given frames 0-2, where there is room; otherwise as
    # far from it as the canvas allows (a few clips then show part of the digit late: the same loss
    # for every policy)
    cands = [y for y in range(0, CANVAS - height + 1)
             if all(yy + height <= dy or yy >= dy + DIGIT for yy in _bar_track(y, speed * direction, CONTEXT_FRAMES, CANVAS - height))]
    if cands:
        y0 = cands[int(torch.randint(0, len(cands), (1,), generator=generator))]
    else:
        y0 = 0 if dy >= CANVAS - dy - DIGIT else CANVAS - height
    return imgs[i], dx, dy, (rx, ry, rw, rh), (speed, height, direction), y0


def make_batch(batch: int, num_frames: int, generator: torch.Generator, digit_pool: str = "train", prompts=None):
    """(latents [B, 4, F, 12, 12] in [-1, 1], prompts [(speed, height, direction)], pixels [B, 1, F, 24, 24]).

    ``digit_pool``: "train" (first 90% of sklearn's digits) or "test" (the rest); ``prompts``:
    fix the bar settings per clip (digit, positions and background stay random)."""
    n = len(_digits()[0])
    lo, hi = (0, int(n * 0.9)) if digit_pool == "train" else (int(n * 0.9), n)
    px = torch.zeros(batch, 1, num_frames, CANVAS, CANVAS)
    out_prompts = []
    for b in range(batch):
        digit, dx, dy, rect, prompt, y0 = _draw_clip(generator, lo, hi, None if prompts is None else tuple(prompts[b]))
        px[b, 0] = render(digit, dx, dy, rect, *prompt, y0, num_frames)
        out_prompts.append(prompt)
    lat = F.pixel_unshuffle(px.transpose(1, 2).reshape(batch * num_frames, 1, CANVAS, CANVAS) * 2 - 1, 2)
    lat = lat.reshape(batch, num_frames, 4, LATENT, LATENT).transpose(1, 2).contiguous()
    return lat, out_prompts, px


def sample_prompts(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    g = torch.Generator().manual_seed(seed)
    return [(SPEEDS[int(torch.randint(0, len(SPEEDS), (1,), generator=g))],
             HEIGHTS[int(torch.randint(0, len(HEIGHTS), (1,), generator=g))],
             DIRECTIONS[int(torch.randint(0, len(DIRECTIONS), (1,), generator=g))]) for _ in range(n)]


def model_world(path: str) -> str | None:
    """The training world a model directory declares in ``world.json`` (None: not declared)."""
    import json

    f = os.path.join(path, "world.json")
    if not os.path.exists(f):
        return None
    with open(f) as fh:
        return json.load(fh).get("world")


def load_occlusion(path: str | None = None, **kw):
    """The shipped occlusion-world pipeline (pixels out; its head file is the forcing-kv default)."""
    from dcache.pipelines.ar_video.pipeline import ARVideoPipeline

    path = path or occlusion_dir()
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"no occlusion-world weights at {path!r}; train them with "
                         "python -m dcache.pipelines.ar_video.train_reference --world occlusion")
    pipe = ARVideoPipeline.from_pretrained(path, **kw)
    pipe.text_encoder = prompt_embeds
    return pipe
