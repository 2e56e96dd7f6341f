"""The AR-video tab's work: the full KV cache (``kv-full``) and a KV policy on the same prompt and seed.

The embedded model (``pipelines/zoo/arvideo_digits``) draws a digit moving at (vx, vy) on a
24x24 canvas. Each side reports its allocated KV bytes and frames per second of denoising.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

import dcache
from dcache.demos.pool import GENERATIONS, BaselineCache, InstancePool

__all__ = ["DEFAULT_VIDEO_MODEL", "VideoSide", "run_video", "BASELINE_POLICY"]

DEFAULT_VIDEO_MODEL = "embedded"
BASELINE_POLICY = "kv-full"
MAX_FRAMES = 48


@dataclass
class VideoSide:
    label: str
    frames: torch.Tensor  # (F, C, H, W) in [0, 1]
    kv_bytes: int
    fps: float
    seconds: float
    stats: dict[str, Any]


_POOLS: dict[str, InstancePool] = {}
_LOCK = threading.Lock()
_BASELINES = BaselineCache()


def _pool(name: str) -> InstancePool:
    from dcache.pipelines.ar_video.reference import load_reference, reference_dir

    name = (name or "").strip()
    path = reference_dir() if name in ("", DEFAULT_VIDEO_MODEL) else name
    if not os.path.isdir(path):
        raise ValueError(f"video model must be {DEFAULT_VIDEO_MODEL!r} or a local AR-video model directory; {name!r} is not a directory")
    with _LOCK:
        if path in _POOLS:
            return _POOLS[path]
    pool = InstancePool(lambda: load_reference(path))
    with pool.checkout():  # load once now, so a bad directory fails here with its message
        pass
    with _LOCK:
        return _POOLS.setdefault(path, pool)


def _check(digit: Any, vx: Any, vy: Any, seed: Any, num_frames: Any) -> tuple[tuple[int, int, int], int, int]:
    from dcache.pipelines.ar_video.reference import VELOCITIES

    try:
        digit, vx, vy, seed, num_frames = int(digit), int(vx), int(vy), int(seed), int(num_frames)
    except (TypeError, ValueError):
        raise ValueError("digit, velocities, seed and frames must be integers") from None
    if not 0 <= digit <= 9 or vx not in VELOCITIES or vy not in VELOCITIES:
        raise ValueError(f"the prompt is a digit 0-9 and velocities vx, vy in {VELOCITIES}, got ({digit}, {vx}, {vy})")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 3 <= num_frames <= MAX_FRAMES or num_frames % 3:
        raise ValueError(f"frames must be a multiple of 3 in [3, {MAX_FRAMES}] (the model makes 3 per chunk), got {num_frames}")
    return (digit, vx, vy), seed, num_frames


def _generate(pool: InstancePool, config: Any, prompt: tuple[int, int, int], seed: int, num_frames: int) -> VideoSide:
    with pool.checkout() as pipe:
        dcache.accelerate(pipe, config)
        try:
            with GENERATIONS.shared():
                out = pipe(prompt=[prompt], num_frames=num_frames, seed=seed)
            stats = pipe.dcache.stats()
        finally:
            dcache.disable(pipe)
    frames = out.frames[0].transpose(0, 1).float().cpu()  # (C, F, H, W) -> (F, C, H, W)
    return VideoSide(type(config).policy_name, frames, int(stats.get("kv_bytes", 0)), float(stats["fps_denoise"]),
                     float(stats["denoise_s"]), stats)


def run_video(model_name: str, digit: Any, vx: Any, vy: Any, seed: Any, num_frames: Any, policy: str,
              options: dict[str, Any], progress: Any = None) -> tuple[VideoSide, VideoSide, bool]:
    """(baseline ``kv-full``, ``policy``, whether the baseline came from the cache)."""
    from dcache.demos.knobs import build_config

    prompt, seed, num_frames = _check(digit, vx, vy, seed, num_frames)
    config = build_config(policy, "ar-video", options)
    pool = _pool(model_name)
    key = (model_name or DEFAULT_VIDEO_MODEL, prompt, seed, num_frames)
    base = _BASELINES.get(key)
    cached = base is not None
    if base is None:
        if progress:
            progress(0.1, f"{BASELINE_POLICY}: {num_frames} frames")
        base = _generate(pool, build_config(BASELINE_POLICY, "ar-video", {}), prompt, seed, num_frames)
        _BASELINES.put(key, base)
    if progress:
        progress(0.55, f"{type(config).policy_name}: {num_frames} frames")
    side = _generate(pool, config, prompt, seed, num_frames)
    return base, side, cached
