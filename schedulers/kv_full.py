"""``kv-full``: keep the whole history of the autoregressive video in the self-attention KV cache.

This is the uncompressed baseline (Self-Forcing with global attention). The buffer is allocated
once per generation for ``num_frames - chunk_frames`` frames (the last chunk is never committed),
so there is no reallocation per chunk.

Example::

    pipe = dcache.accelerate(pipe, policy="kv-full")
"""

from __future__ import annotations

from dataclasses import dataclass

from dcache.registry import register_policy
from dcache.schedulers._kv_ring import ARKVCache, CacheLayout, HeadGroup


class FullKVCache(ARKVCache):
    policy = "kv-full"

    def __init__(self, layout: CacheLayout):
        super().__init__(layout)
        cap = max(0, layout.num_frames - layout.chunk_frames) * layout.tokens_per_frame
        self.groups = [[HeadGroup(layout, None, [("history", cap)])] for _ in range(layout.num_layers)]

    def _commit(self, layer: int, frame_start: int) -> None:
        g = self.groups[layer][0]
        k, v = g.chunk_kv()
        C = self.layout.chunk_frames
        r = g.regions["history"]
        if r.valid + C * self.layout.tokens_per_frame > r.cap:
            raise ValueError(f"kv-full cache was laid out for {self.layout.num_frames} frames; frame {frame_start + C} does not fit")
        g.append("history", k, v, self._frame_positions(frame_start, range(frame_start, frame_start + C)))


@register_policy("kv-full", description="AR video: full self-attention KV history (baseline)", task="ar-video", granularity="kv")
@dataclass
class KVFullConfig:
    """No options: every committed frame stays in the cache."""

    def build_cache(self, layout: CacheLayout) -> FullKVCache:
        return FullKVCache(layout)
