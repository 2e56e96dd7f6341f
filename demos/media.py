"""Tensors → what the page shows: upscaled images, a difference map, browser-playable MP4."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from PIL import Image

__all__ = ["to_pil", "diff_map", "write_mp4", "psnr", "UPSCALE"]

# The embedded models draw 24-32 px images; nearest-neighbour upscaling keeps every pixel visible
# (and lets a test read the original back by taking every UPSCALE-th pixel).
UPSCALE = 8


def _scale_for(h: int) -> int:
    return max(1, min(UPSCALE, 256 // max(h, 1)))


def to_pil(img: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] → RGB PIL image, small images upscaled by whole pixels."""
    x = img.detach().float().clamp(0, 1).cpu()
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    arr = (x.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    s = _scale_for(arr.shape[0])
    if s > 1:
        arr = arr.repeat(s, axis=0).repeat(s, axis=1)
    return Image.fromarray(arr)


def diff_map(a: torch.Tensor, b: torch.Tensor) -> tuple[Image.Image, float]:
    """|a - b| averaged over channels, as a colour map scaled to its own maximum; also that maximum."""
    from matplotlib import colormaps

    d = (a.float() - b.float()).abs().mean(0).cpu().numpy()
    peak = float(d.max())
    norm = d / peak if peak > 0 else d
    rgb = (colormaps["inferno"](norm)[..., :3] * 255).round().astype(np.uint8)
    s = _scale_for(rgb.shape[0])
    if s > 1:
        rgb = rgb.repeat(s, axis=0).repeat(s, axis=1)
    return Image.fromarray(rgb), peak


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two tensors in [0, 1] (inf when identical)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


_VIDEO_DIR: str | None = None
_KEEP_VIDEOS = 32


def _new_video_path() -> str:
    """A fresh file in this process's video folder; the oldest are removed (Gradio serves its own copy)."""
    global _VIDEO_DIR
    if _VIDEO_DIR is None:
        _VIDEO_DIR = tempfile.mkdtemp(prefix="dcache-demo-videos-")
    files = sorted((os.path.join(_VIDEO_DIR, f) for f in os.listdir(_VIDEO_DIR)), key=os.path.getmtime)
    for old in files[:-_KEEP_VIDEOS]:
        try:
            os.remove(old)
        except OSError:
            pass
    fd, path = tempfile.mkstemp(suffix=".mp4", dir=_VIDEO_DIR)
    os.close(fd)
    return path


def write_mp4(frames: torch.Tensor, fps: int = 8, path: str | None = None) -> str:
    """(F, C, H, W) in [0, 1] → an H.264 MP4 (yuv420p: what browsers play) written with the ffmpeg
    binary that the ``imageio-ffmpeg`` wheel ships; returns the path."""
    import imageio_ffmpeg

    x = frames.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    arr = (x.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
    s = _scale_for(arr.shape[1])
    arr = arr.repeat(s, axis=1).repeat(s, axis=2)
    h, w = arr.shape[1:3]
    if path is None:
        path = _new_video_path()
    writer = imageio_ffmpeg.write_frames(path, (w, h), fps=fps, codec="libx264", macro_block_size=8,
                                         output_params=["-movflags", "+faststart"])
    writer.send(None)
    for frame in arr:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path
