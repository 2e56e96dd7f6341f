"""``grid.png``: one row per configuration, one column per sample, headers, difference maps.

Under every accelerated row sits its difference map against the baseline: ``|x - baseline|``
per pixel (mean over channels), amplified ``gain`` times so small drifts are visible; black is
identical.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["write_grid"]


def _tile(img: torch.Tensor, scale: int):
    from PIL import Image

    img = img.clamp(0, 1)
    if img.shape[0] == 1:
        img = img.repeat(3, 1, 1)
    arr = (img[:3].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr).resize((img.shape[2] * scale, img.shape[1] * scale), Image.NEAREST)


def write_grid(path: str, columns: Sequence[str], rows: Sequence[tuple[str, torch.Tensor]], gain: float = 4.0,
               max_columns: int = 8) -> None:
    """``rows``: (label, images (N, C, H, W) in [0, 1]); the first row is the baseline."""
    from PIL import Image, ImageDraw

    if not rows:
        return
    n = min(max_columns, len(columns), *(t.shape[0] for _, t in rows))
    h, w = rows[0][1].shape[2:]
    scale = max(1, 96 // max(h, w))
    tw, th, pad, label_w, head_h = w * scale, h * scale, 3, 190, 18
    base = rows[0][1]
    lines: list[tuple[str, torch.Tensor]] = []
    for i, (name, imgs) in enumerate(rows):
        lines.append((name, imgs[:n]))
        if i > 0:
            diff = (imgs[:n] - base[:n]).abs().mean(1, keepdim=True).mul(gain)
            lines.append((f"  |diff| x{gain:g}", diff))
    canvas = Image.new("RGB", (label_w + n * (tw + pad), head_h + len(lines) * (th + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c in range(n):
        draw.text((label_w + c * (tw + pad) + 2, 3), columns[c][: max(4, tw // 6)], fill="black")
    for r, (name, imgs) in enumerate(lines):
        y = head_h + r * (th + pad)
        draw.text((4, y + th // 2 - 6), name[:30], fill="gray" if name.startswith("  |diff|") else "black")
        for c in range(n):
            canvas.paste(_tile(imgs[c], scale), (label_w + c * (tw + pad), y))
    canvas.save(path)
