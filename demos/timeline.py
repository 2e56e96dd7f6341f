"""The per-step timeline of a generation (``stats()["timeline"]``): a plot and a text summary.

One timeline entry per denoiser call: ``{"step", "branch", "timestep", "sites": {site: kind}}``
with kind in computed / reused / forecast. Sites are whatever the policies cache (a step-level
span of blocks such as ``blocks[0:6]``, or module sites such as ``...transformer_blocks.0.attn``),
so a list of policies at several granularities shows up as rows of both kinds.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["KINDS", "summary_lines", "plot"]

KINDS = ("computed", "reused", "forecast")
_COLOURS = {"computed": (0.20, 0.45, 0.85), "reused": (0.95, 0.65, 0.15), "forecast": (0.30, 0.70, 0.35)}


def _short(site: str) -> str:
    # "FluxTransformer2DModel.transformer_blocks.0.attn" → "transformer_blocks.0.attn"
    head, _, rest = site.partition(".")
    return rest if rest and head[:1].isupper() else site


def summary_lines(timeline: list[dict[str, Any]]) -> list[str]:
    """One line per denoiser call: ``step 3 branch 0: computed 4, reused 0, forecast 6``."""
    lines = []
    for e in timeline:
        counts = {k: 0 for k in KINDS}
        for kind in e["sites"].values():
            counts[kind] = counts.get(kind, 0) + 1
        lines.append(f"step {e['step']} branch {e['branch']}: " + ", ".join(f"{k} {counts[k]}" for k in KINDS))
    return lines


def plot(timeline: list[dict[str, Any]], title: str = "") -> Image.Image:
    """A grid per guidance branch: rows are sites, columns steps, colour what the site did."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    branches = sorted({e["branch"] for e in timeline}) or [0]
    sites: list[str] = []
    for e in timeline:
        for s in e["sites"]:
            if s not in sites:
                sites.append(s)
    steps = sorted({e["step"] for e in timeline})
    col = {s: i for i, s in enumerate(steps)}
    row = {s: i for i, s in enumerate(sites)}
    height = 1.1 + (0.3 * max(len(sites), 1) + 0.5) * len(branches)
    fig, axes = plt.subplots(len(branches), 1, figsize=(8, height), squeeze=False)
    for ax, b in zip(axes[:, 0], branches):
        grid = np.ones((max(len(sites), 1), max(len(steps), 1), 3))
        for e in timeline:
            if e["branch"] != b:
                continue
            for s, kind in e["sites"].items():
                grid[row[s], col[e["step"]]] = _COLOURS.get(kind, (0.5, 0.5, 0.5))
        ax.imshow(grid, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(sites)), [_short(s) for s in sites], fontsize=7)
        ax.set_ylabel(f"branch {b}", fontsize=8)
        ticks = list(range(0, len(steps), max(1, len(steps) // 12)))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
    axes[-1, 0].set_xlabel("denoising step" + (f"  ({title})" if title else ""), fontsize=8)
    fig.legend(handles=[Patch(color=_COLOURS[k], label=k) for k in KINDS], loc="lower left", ncol=3, fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
