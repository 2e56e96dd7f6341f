"""The reference causal video model: moving digits, a tiny WanTransformer3DModel, its "text" table.

Data (made here, no download): a sklearn 8x8 digit, upscaled to 12x12, moves at a constant
velocity on a 24x24 canvas and bounces off the borders; a static rectangle outline sits in the
background. The prompt is three tokens: (digit, vx, vy), embedded by a fixed seeded table. Pixels
in [0, 1] map to [-1, 1]; the "latent" is a 2x depth-to-space of the frame (4 x 12 x 12), so the
pipeline's decoder is pixel_shuffle(2) and tokens per frame are 6 x 6 = 36.

Example::

    from dcache.pipelines.ar_video.reference import load_reference, prompt_embeds
    pipe = load_reference()
    video = pipe(prompt_embeds([[3, 1, -2]]), num_frames=12).frames      # [1, 1, 12, 24, 24]
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["MODEL_KWARGS", "CANVAS", "VELOCITIES", "make_batch", "prompt_embeds", "build_transformer",
           "reference_dir", "load_reference", "sample_prompts"]

CANVAS = 24
DIGIT = 12
VELOCITIES = (-2, -1, 1, 2)
LATENT = CANVAS // 2
TEXT_DIM = 32
MODEL_KWARGS = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                    text_dim=TEXT_DIM, freq_dim=64, ffn_dim=192, num_layers=4, rope_max_seq_len=128)
NAME = "arvideo_digits"


def reference_dir() -> str:
    import dcache.pipelines.zoo as zoo

    return os.path.join(os.path.dirname(zoo.__file__), NAME)


@lru_cache(maxsize=1)
def _digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.tensor(d.images, dtype=torch.float32) / 16.0
    up = F.interpolate(img[:, None], size=(DIGIT, DIGIT), mode="bilinear", align_corners=False)[:, 0]
    return up.clamp(0, 1), torch.tensor(d.target)


@lru_cache(maxsize=1)
def _text_table() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(10 + 2 * len(VELOCITIES), TEXT_DIM, generator=g)


def prompt_embeds(prompts) -> torch.Tensor:
    """[(digit, vx, vy), ...] -> [B, 3, 32] text embeddings (vx, vy in VELOCITIES)."""
    tab = _text_table()
    rows = []
    for p in prompts:
        digit, vx, vy = (int(a) for a in p)
        if not 0 <= digit <= 9 or vx not in VELOCITIES or vy not in VELOCITIES:
            raise ValueError(f"prompt must be (digit 0-9, vx, vy) with vx, vy in {VELOCITIES}, got {p!r}")
        rows.append(torch.stack([tab[digit], tab[10 + VELOCITIES.index(vx)], tab[10 + len(VELOCITIES) + VELOCITIES.index(vy)]]))
    return torch.stack(rows)


def _bounce(p0: int, v: int, n: int, hi: int) -> list[int]:
    out, p = [], p0
    for _ in range(n):
        out.append(p)
        p += v
        if p < 0 or p > hi:
            v = -v
            p = max(0, min(hi, p + 2 * v))
    return out


def make_batch(batch: int, num_frames: int, generator: torch.Generator, digit_pool: str = "train"):
    """Return (latents [B, 4, F, 12, 12] in [-1, 1], prompts [(digit, vx, vy)], pixels [B, 1, F, 24, 24])."""
    imgs, labels = _digits()
    n = len(imgs)
    lo, hi = (0, int(n * 0.9)) if digit_pool == "train" else (int(n * 0.9), n)
    px = torch.zeros(batch, 1, num_frames, CANVAS, CANVAS)
    prompts = []
    for b in range(batch):
        i = int(torch.randint(lo, hi, (1,), generator=generator))
        vx, vy = (VELOCITIES[int(j)] for j in torch.randint(0, len(VELOCITIES), (2,), generator=generator))
        x0, y0, rx, ry, rw, rh = (int(a) for a in torch.randint(0, CANVAS - DIGIT + 1, (6,), generator=generator))
        rw, rh = 4 + rw % 8, 4 + rh % 8
        rx, ry = min(rx, CANVAS - rw), min(ry, CANVAS - rh)
        bg = torch.zeros(CANVAS, CANVAS)
        bg[ry : ry + rh, rx] = bg[ry : ry + rh, rx + rw - 1] = 0.5
        bg[ry, rx : rx + rw] = bg[ry + rh - 1, rx : rx + rw] = 0.5
        xs, ys = _bounce(x0, vx, num_frames, CANVAS - DIGIT), _bounce(y0, vy, num_frames, CANVAS - DIGIT)
        for f in range(num_frames):
            fr = bg.clone()
            fr[ys[f] : ys[f] + DIGIT, xs[f] : xs[f] + DIGIT] = torch.maximum(fr[ys[f] : ys[f] + DIGIT, xs[f] : xs[f] + DIGIT], imgs[i])
            px[b, 0, f] = fr
        prompts.append((int(labels[i]), vx, vy))
    lat = F.pixel_unshuffle(px.transpose(1, 2).reshape(batch * num_frames, 1, CANVAS, CANVAS) * 2 - 1, 2)
    lat = lat.reshape(batch, num_frames, 4, LATENT, LATENT).transpose(1, 2).contiguous()
    return lat, prompts, px


def sample_prompts(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        d = int(torch.randint(0, 10, (1,), generator=g))
        vx, vy = (VELOCITIES[int(j)] for j in torch.randint(0, len(VELOCITIES), (2,), generator=g))
        out.append((d, vx, vy))
    return out


def build_transformer(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**MODEL_KWARGS)


def load_reference(path: str | None = None, **kw):
    """The shipped trained reference pipeline (pixels out; its head file is the forcing-kv default)."""
    from dcache.pipelines.ar_video.pipeline import ARVideoPipeline

    path = path or reference_dir()
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"no reference weights at {path!r}; train them with python -m dcache.pipelines.ar_video.train_reference")
    pipe = ARVideoPipeline.from_pretrained(path, **kw)
    pipe.text_encoder = prompt_embeds
    return pipe
