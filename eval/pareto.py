"""Speedup against one quality metric: the Pareto frontier and its plot.

A row is on the frontier when no other row is at least as fast and at least as good, and
strictly better in one of the two. Labels are placed greedily around their points so that no
two label boxes (and no label and marker) overlap.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["LOWER_IS_BETTER", "frontier", "plot"]

LOWER_IS_BETTER = {"lpips", "fid", "kid", "wall_s", "computed_fraction", "peak_mem_bytes"}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def frontier(rows: Sequence[dict], metric: str) -> list[int]:
    """Indices (into ``rows``) of the Pareto-optimal rows by (speedup ↑, metric ↑ or ↓)."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    pts = [(i, r["speedup"], sign * r[metric]) for i, r in enumerate(rows)
           if _finite(r.get("speedup")) and _finite(r.get(metric))]
    keep = []
    for i, s, q in pts:
        dominated = any(s2 >= s and q2 >= q and (s2 > s or q2 > q) for j, s2, q2 in pts if j != i)
        if not dominated:
            keep.append(i)
    return keep


def plot(path: str, rows: Sequence[dict], metric: str = "psnr") -> None:
    """``pareto.png``: every row with a speedup and a finite ``metric``; the baseline at 1x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = {"dcache": "o", "diffusers": "s", "cache-dit": "^", "baseline": "*"}
    front = set(frontier(rows, metric))
    shown = [(i, r) for i, r in enumerate(rows) if _finite(r.get("speedup")) and _finite(r.get(metric))]
    base = next((r for r in rows if r.get("source") == "baseline"), None)
    if base is not None:
        ax.axvline(1.0, color="0.6", lw=1, ls="--", zorder=0)
        if _finite(base.get(metric)):
            ax.axhline(base[metric], color="0.6", lw=1, ls=":", zorder=0)
    for i, r in shown:
        on = i in front
        is_base = r.get("source") == "baseline"
        ax.scatter(r["speedup"], r[metric], marker=markers.get(r.get("source"), "x"), s=140 if is_base else 50,
                   c="black" if is_base else ("tab:red" if on else "tab:blue"), zorder=3,
                   edgecolors="black" if on and not is_base else "none")
    # The baseline against itself is often not finite (PSNR = inf): mark it at 1x on the top edge.
    ys = [r[metric] for _, r in shown]
    base_mark = None
    if base is not None and not _finite(base.get(metric)) and ys:
        sign = -1 if metric in LOWER_IS_BETTER else 1
        best = max(ys) if sign > 0 else min(ys)
        span = (max(ys) - min(ys)) or abs(best) or 1.0
        base_mark = (1.0, best + sign * 0.15 * span)
        ax.scatter(*base_mark, marker="*", s=140, c="black", zorder=3)
    fr = sorted((rows[i]["speedup"], rows[i][metric]) for i in front)
    if len(fr) > 1:
        ax.plot([p[0] for p in fr], [p[1] for p in fr], color="tab:red", lw=1.2, zorder=2, label="Pareto frontier")
    ax.scatter([], [], c="tab:blue", label="dominated")
    ax.scatter([], [], marker="*", c="black", s=80, label="baseline (1x)")
    ax.set_xlabel("speedup vs baseline (same seeds, same session)")
    ax.set_ylabel(f"{metric} vs baseline" + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.margins(0.15)
    fig.tight_layout()
    labels = [(rows[i]["speedup"], rows[i][metric], _label(rows[i])) for i, _ in shown]
    if base_mark is not None:
        labels.append((*base_mark, f"baseline ({metric} vs itself: {base.get(metric)})"))
    _place_labels(fig, ax, labels)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label(r: dict) -> str:
    lab = r.get("label") or r.get("policy", "?")
    return lab if r.get("source") in ("dcache", "baseline", None) else f"{r['source']}:{lab}"


def _place_labels(fig: Any, ax: Any, points: list[tuple[float, float, str]]) -> list[Any]:
    """Put each label at the first of several offsets where its box overlaps nothing placed so far."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = []  # display-space boxes (x0, y0, x1, y1) of markers and placed labels
    for x, y in ((p[0], p[1]) for p in points):
        px, py = ax.transData.transform((x, y))
        taken.append((px - 5, py - 5, px + 5, py + 5))
    offsets = [(6, 4), (6, -12), (-6, 4), (-6, -12), (6, 14), (-6, 14), (6, -22), (-6, -22), (14, 24), (-14, 24),
               (14, -32), (-14, -32), (6, 34), (6, -42)]
    texts = []
    for x, y, text in points:
        placed = None
        for dx, dy in offsets:
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                            ha="left" if dx > 0 else "right", arrowprops=None)
            bb = t.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            inside = frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1
            if inside and not any(_overlap(box, o) for o in taken):
                placed = (t, box)
                break
            t.remove()
        if placed is None:  # crowded: the last resort still draws it, with a leader line
            t = ax.annotate(text, (x, y), xytext=(20, 50), textcoords="offset points", fontsize=6,
                            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"})
            bb = t.get_window_extent(renderer)
            placed = (t, (bb.x0, bb.y0, bb.x1, bb.y1))
        taken.append(placed[1])
        texts.append(placed[0])
    return texts


def _overlap(a: tuple, b: tuple) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])
