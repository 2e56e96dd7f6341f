"""``kv-rolling``: attention sink + sliding window of recent frames (Self-Forcing local attention /
LongLive style).

The first ``sink_frames`` frames are pinned; the newest ``window_frames`` committed frames live in a
ring buffer that overwrites its oldest frame in place.

Example::

    pipe = dcache.accelerate(pipe, policy="kv-rolling", sink_frames=1, window_frames=6)
"""

from __future__ import annotations

from dataclasses import dataclass

from dcache.registry import register_policy
from dcache.schedulers._kv_ring import ARKVCache, CacheLayout, HeadGroup


class RollingKVCache(ARKVCache):
    policy = "kv-rolling"

    def __init__(self, layout: CacheLayout, sink_frames: int, window_frames: int):
        super().__init__(layout)
        self.sink_frames = sink_frames
        T = layout.tokens_per_frame
        regions = [("sink", sink_frames * T), ("window", window_frames * T)]
        self.groups = [[HeadGroup(layout, None, regions)] for _ in range(layout.num_layers)]

    def _commit(self, layer: int, frame_start: int) -> None:
        self._commit_sink_then(self.groups[layer][0], frame_start, "window", self.sink_frames)


@register_policy("kv-rolling", description="AR video: sink frames + sliding window ring buffer", task="ar-video", granularity="kv")
@dataclass
class KVRollingConfig:
    """sink_frames: pinned first frames (>= 0). window_frames: newest committed frames kept (>= 1)."""

    sink_frames: int = 1
    window_frames: int = 6

    def __post_init__(self) -> None:
        if not isinstance(self.sink_frames, int) or self.sink_frames < 0:
            raise ValueError(f"sink_frames must be an int >= 0, got {self.sink_frames!r}")
        if not isinstance(self.window_frames, int) or self.window_frames < 1:
            raise ValueError(f"window_frames must be an int >= 1, got {self.window_frames!r}")

    def build_cache(self, layout: CacheLayout) -> RollingKVCache:
        return RollingKVCache(layout, self.sink_frames, self.window_frames)
