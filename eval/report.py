"""Writing benchmark results: JSON rows, a text table, a sample grid and a speed/quality plot."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import torch

COLUMNS = [("source", 9), ("label", 8), ("wall_s", 8), ("speedup", 8), ("computed_fraction", 9),
           ("psnr", 7), ("ssim", 6), ("lpips", 6), ("class_accuracy", 8),
           ("adherence", 9), ("attributes", 10)]
HEADERS = {"computed_fraction": "computed", "class_accuracy": "class_acc", "label": "policy"}


def label(policy: str, options: dict) -> str:
    """``taylorseer(interval=5,order=1)``: a row's policy with the options it ran with."""
    if not options:
        return policy
    return f"{policy}({','.join(f'{k}={v}' for k, v in options.items())})"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def table(rows: Sequence[dict]) -> str:
    widths = [max([w, len(HEADERS.get(c, c))] + [len(_fmt(r.get(c))) for r in rows]) for c, w in COLUMNS]
    head = "  ".join(HEADERS.get(c, c).ljust(w) for (c, _), w in zip(COLUMNS, widths))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).ljust(w) for (c, _), w in zip(COLUMNS, widths)))
    return "\n".join(lines)


def markdown(rows: Sequence[dict]) -> str:
    """The same table in Markdown (for READMEs and notes)."""
    cols = [c for c, _ in COLUMNS if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines)


def write_json(path: str, rows: Sequence[dict], meta: dict) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return v

    payload = [{k: clean(v) for k, v in r.items()} for r in rows]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    with open(os.path.join(os.path.dirname(path), "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


def grid(path: str, labelled: Sequence[tuple[str, torch.Tensor]], scale: int = 3) -> None:
    """One row per run (baseline first), one column per sample; images (N, C, H, W) in [0, 1]."""
    from PIL import Image, ImageDraw

    n = min(t.shape[0] for _, t in labelled)
    c, h, w = labelled[0][1].shape[1:]
    label_w = 150
    pad = 2
    canvas = Image.new("RGB", (label_w + n * (w * scale + pad), len(labelled) * (h * scale + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (name, imgs) in enumerate(labelled):
        y = row * (h * scale + pad)
        draw.text((4, y + h * scale // 2 - 6), name[:22], fill="black")
        for col in range(n):
            img = imgs[col].clamp(0, 1)
            if img.shape[0] == 1:
                img = img.repeat(3, 1, 1)
            arr = (img[:3].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            tile = Image.fromarray(arr).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + col * (w * scale + pad), y))
    canvas.save(path)


def pareto(path: str, rows: Sequence[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"dcache": "o", "diffusers": "s", "cache-dit": "^"}
    for r in rows:
        if r.get("policy") == "baseline" or r.get("psnr") is None or not math.isfinite(r["psnr"]):
            continue
        ax.scatter(r["speedup"], r["psnr"], marker=markers.get(r["source"], "x"), s=50,
                   label=f'{r["source"]}: {r.get("label", r["policy"])}')
        ax.annotate(r.get("label", r["policy"]), (r["speedup"], r["psnr"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("wall-clock speedup vs baseline (same run)")
    ax.set_ylabel("PSNR vs baseline (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
