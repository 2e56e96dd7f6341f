"""Read and write Forcing-KV head files (per-layer static/dynamic head split).

Format (the one Forcing-KV ships, so its released files load here)::

    {"format": "...", "profile": "...", "num_layers": L, "num_heads": H,
     "layers": [{"layer_idx": 0, "static_head": [...], "dynamic_head": [...]}, ...]}

A bare list of layer dicts is accepted too. Key aliases: ``static_heads``, ``local_head(s)``,
``spatial_head(s)`` for static; ``dynamic_heads``, ``temporal_head(s)`` for dynamic. In every listed
layer, static and dynamic must be disjoint and together cover all heads. Layers not listed are
all-dynamic (the reference loader does the same).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

__all__ = ["HeadSplit", "load_head_file", "save_head_file", "HEAD_FILE_FORMAT"]

HEAD_FILE_FORMAT = "forcingkv-heads-v1"
_STATIC_KEYS = ("static_head", "static_heads", "local_head", "local_heads", "spatial_head", "spatial_heads")
_DYNAMIC_KEYS = ("dynamic_head", "dynamic_heads", "temporal_head", "temporal_heads")


@dataclass
class HeadSplit:
    num_layers: int
    num_heads: int
    static: list[list[int]]
    dynamic: list[list[int]]
    meta: dict = field(default_factory=dict)

    def counts(self) -> tuple[int, int]:
        return sum(map(len, self.static)), sum(map(len, self.dynamic))


def _pick(d: dict, keys: tuple[str, ...], what: str, where: str):
    found = [k for k in keys if k in d]
    if len(found) > 1:
        raise ValueError(f"{where}: several keys for {what} heads: {found}; use one of {list(keys)}")
    return d[found[0]] if found else None


def load_head_file(path: str | os.PathLike, num_layers: int | None = None, num_heads: int | None = None) -> HeadSplit:
    """Load and validate a head file; ``num_layers``/``num_heads`` are checked when given."""
    where = f"head file {os.fspath(path)!r}"
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{where} does not exist; run the head profiler (dcache.pipelines.ar_video.profiler) to make one") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from None
    if isinstance(data, list):
        layers, meta = data, {}
    elif isinstance(data, dict) and isinstance(data.get("layers"), list):
        layers, meta = data["layers"], {k: v for k, v in data.items() if k != "layers"}
    else:
        raise ValueError(f"{where}: expected a dict with a 'layers' list or a bare list of layer dicts")
    L = meta.get("num_layers", num_layers)
    H = meta.get("num_heads", num_heads)
    if num_layers is not None and L != num_layers:
        raise ValueError(f"{where} is for {L} layers, the model has {num_layers}")
    if num_heads is not None and H != num_heads:
        raise ValueError(f"{where} is for {H} heads per layer, the model has {num_heads}")
    if not isinstance(L, int) or not isinstance(H, int) or L < 1 or H < 1:
        raise ValueError(f"{where}: num_layers and num_heads must be positive ints (in the file or given), got {L!r}, {H!r}")
    static: list[list[int] | None] = [None] * L
    dynamic: list[list[int] | None] = [None] * L
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise ValueError(f"{where}: layer entry {i} must be a dict, got {type(layer).__name__}")
        li = layer.get("layer_idx", i)
        if not isinstance(li, int) or not 0 <= li < L:
            raise ValueError(f"{where}: layer_idx {li!r} out of range [0, {L})")
        if static[li] is not None:
            raise ValueError(f"{where}: layer {li} is listed twice")
        s = _pick(layer, _STATIC_KEYS, "static", f"{where} layer {li}") or []
        d = _pick(layer, _DYNAMIC_KEYS, "dynamic", f"{where} layer {li}") or []
        for name, heads in (("static", s), ("dynamic", d)):
            if not isinstance(heads, list) or not all(isinstance(h, int) and 0 <= h < H for h in heads):
                raise ValueError(f"{where} layer {li}: {name} heads must be a list of ints in [0, {H}), got {heads!r}")
        if set(s) & set(d):
            raise ValueError(f"{where} layer {li}: heads {sorted(set(s) & set(d))} are both static and dynamic")
        if set(s) | set(d) != set(range(H)) or len(s) + len(d) != H:
            raise ValueError(f"{where} layer {li}: static + dynamic must be exactly heads 0..{H - 1} once each, got static={s} dynamic={d}")
        static[li], dynamic[li] = sorted(s), sorted(d)
    for li in range(L):
        if static[li] is None:
            static[li], dynamic[li] = [], list(range(H))
    return HeadSplit(L, H, static, dynamic, meta)  # type: ignore[arg-type]


def save_head_file(split: HeadSplit, path: str | os.PathLike, profile: str = "", **meta) -> None:
    """Write ``split`` in the Forcing-KV layout (``static_head`` / ``dynamic_head`` per layer)."""
    data = {"format": HEAD_FILE_FORMAT, "profile": profile, "num_layers": split.num_layers, "num_heads": split.num_heads}
    data.update(meta)
    data["layers"] = [
        {"layer_idx": i, "static_head": list(split.static[i]), "dynamic_head": list(split.dynamic[i])} for i in range(split.num_layers)
    ]
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
