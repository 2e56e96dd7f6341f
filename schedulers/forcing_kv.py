"""``forcing-kv``: hybrid KV compression with an offline static/dynamic head split.

After Forcing-KV (arXiv 2605.09681, zju-jiyicheng/Forcing-KV; behaviour summarised in
``docs/ar_video.md``, no code taken). Per layer, heads are split by an offline profile
(:mod:`dcache.pipelines.ar_video.profiler` writes the head file):

* **static heads** keep the sink frames + the newest ``static_ctx_frames`` committed frames (the
  "transition" frame) + the current chunk;
* **dynamic heads** keep the sink + the newest ``dynamic_ring_frames`` frames + a fixed buffer of
  ``dynamic_budget_frames`` frame-equivalents filled with the segments that changed most. Every
  clean pass, the frames that leave the dynamic ring are cut into ``num_segments`` raster-order
  segments, each scored by the mean cosine similarity of its keys (all dynamic heads flattened)
  with the same positions in the next frame; the lowest-similarity segments replace the buffer's
  content. The selection is computed by the first layer that has dynamic heads and reused by the
  other layers, for each sample of the batch separately (the reference scores batch element 0
  and applies its choice to the whole batch).

Layers in ``unsplit_layers`` (default: layer 0, as in the reference) treat every head as static.
Deviation from the reference: the split applies from the first commit (the reference switches at
``ar_start``=1 and before that cuts all heads to sink + 1 frame, which is the static rule).

Example::

    pipe = dcache.accelerate(pipe, policy="forcing-kv", head_file="heads.json", dynamic_budget_frames=1)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dcache.registry import register_policy
from dcache.schedulers._forcing_heads import HeadSplit, load_head_file
from dcache.schedulers._kv_ring import ARKVCache, CacheLayout, HeadGroup


class ForcingKVCache(ARKVCache):
    policy = "forcing-kv"

    def __init__(self, layout: CacheLayout, cfg: "ForcingKVConfig", split: HeadSplit):
        super().__init__(layout)
        T, H = layout.tokens_per_frame, layout.num_heads
        self.num_segments = cfg.segments_for(T)
        if split.num_layers != layout.num_layers or split.num_heads != H:
            raise ValueError(f"head split is for {split.num_layers}x{split.num_heads} heads, model has {layout.num_layers}x{H}")
        self.cfg, self.split = cfg, split
        self.seg_tokens = T // self.num_segments
        self._sel: torch.Tensor | None = None  # [B, n] token indices, shared by the layers of one commit
        self._buf_scores: torch.Tensor | None = None
        s_regions = [("sink", cfg.sink_frames * T), ("ring", cfg.static_ctx_frames * T)]
        d_regions = [("sink", cfg.sink_frames * T), ("ring", cfg.dynamic_ring_frames * T), ("selected", cfg.dynamic_budget_frames * T)]
        for layer in range(layout.num_layers):
            static = list(range(H)) if layer in cfg.unsplit_layers else split.static[layer]
            dynamic = [h for h in range(H) if h not in static]
            groups = []
            if static:
                groups.append(HeadGroup(layout, None if not dynamic else static, s_regions))
                groups[-1].kind = "static"
            if dynamic:
                groups.append(HeadGroup(layout, None if not static else dynamic, d_regions))
                groups[-1].kind = "dynamic"
            self.groups.append(groups)

    def _commit(self, layer: int, frame_start: int) -> None:
        if layer == 0:
            self._sel = None
        for g in self.groups[layer]:
            if g.kind == "static":
                self._commit_sink_then(g, frame_start, "ring", self.cfg.sink_frames)
            else:
                self._commit_dynamic(g, frame_start)

    def _commit_dynamic(self, g: HeadGroup, frame_start: int) -> None:
        T, C = self.layout.tokens_per_frame, self.layout.chunk_frames
        k, v = g.chunk_kv()
        n_sink = max(0, min(C, self.cfg.sink_frames - frame_start))
        if n_sink:
            g.append("sink", k[:, :, : n_sink * T], v[:, :, : n_sink * T], self._frame_positions(frame_start, range(frame_start, frame_start + n_sink)))
        new_k, new_v = k[:, :, n_sink * T :], v[:, :, n_sink * T :]
        new_pos = self._frame_positions(frame_start, range(frame_start + n_sink, frame_start + C))
        ring, sel_region = g.regions["ring"], g.regions["selected"]
        old_slots = ring.chrono_slots()
        n_frames = (len(old_slots) + new_k.shape[2]) // T
        n_cand = max(0, n_frames - ring.cap // T)
        if n_cand and sel_region.cap:
            B = k.shape[0]
            old_k, old_v = g.region_kv("ring", old_slots)
            seq_k, seq_v = torch.cat([old_k, new_k], 2), torch.cat([old_v, new_v], 2)
            seq_pos = torch.cat([ring.pos[old_slots], new_pos]).expand(B, -1)
            n_kept = sel_region.valid if self.cfg.keep_selected else 0
            if n_kept:  # the buffer's segments compete again, on the scores they were chosen with
                buf_slots = torch.arange(n_kept)
                buf_k, buf_v = g.region_kv("selected", buf_slots)
                seq_k, seq_v = torch.cat([buf_k, seq_k], 2), torch.cat([buf_v, seq_v], 2)
                buf_pos = sel_region.pos_b[:, :n_kept] if sel_region.pos_b is not None else sel_region.pos[:n_kept].expand(B, -1)
                seq_pos = torch.cat([buf_pos, seq_pos], 1)
            if self._sel is None or int(self._sel.max()) >= seq_k.shape[2]:
                prior = self._buf_scores if n_kept else None
                self._sel, self._buf_scores = select_segments(
                    seq_k[:, :, n_kept:], T, n_cand, self.num_segments, sel_region.cap // self.seg_tokens,
                    selection=self.cfg.selection, generator=self._rng(frame_start), prior_scores=prior)
            idx = self._sel.to(seq_k.device)
            gi = idx[:, None, :, None].expand(-1, seq_k.shape[1], -1, seq_k.shape[3])
            g.overwrite("selected", seq_k.gather(2, gi), seq_v.gather(2, gi), seq_pos.gather(1, self._sel))
        g.append("ring", new_k, new_v, new_pos)

    def _rng(self, frame_start: int) -> torch.Generator | None:
        if self.cfg.selection != "random":
            return None
        # the same draw for every layer and every run with the same seed (rows compare at equal seeds)
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + frame_start)

    def reset(self) -> None:
        super().reset()
        self._sel = self._buf_scores = None

    def stats(self) -> dict:
        s = super().stats()
        ns, nd = self.split.counts()
        s.update(static_heads=ns, dynamic_heads=nd)
        return s


SELECTIONS = ("lowest", "highest", "random")


def select_segments(seq_k: torch.Tensor, tokens_per_frame: int, n_cand: int, num_segments: int, max_segments: int,
                    selection: str = "lowest", generator: torch.Generator | None = None,
                    prior_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, token indices (sorted) of the segments to keep, and their scores.

    ``seq_k`` is ``[B, Hg, n_frames * T, D]`` in time order; the first ``n_cand`` frames are the
    candidates and frame ``i + 1`` is the successor of candidate ``i``. A segment's score is the
    mean cosine similarity of its keys (all heads of the group flattened) with the same positions
    in the successor frame, **for each sample separately** (the reference scores batch element 0 and
    applies its choice to the whole batch). ``selection``: "lowest" (Forcing-KV: the most changed
    content), "highest", or "random" (uniform, from ``generator``: a control).

    ``prior_scores`` (``[B, m]``): ``m`` segments already held (placed *before* ``seq_k`` in the
    index space the result refers to) compete with the candidates on these scores.
    Returns ``(indices [B, k * seg], scores [B, k])``.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    T, P = tokens_per_frame, num_segments
    seg = T // P
    B, Hg, _, D = seq_k.shape
    frames = seq_k[:, :, : (n_cand + 1) * T].reshape(B, Hg, n_cand + 1, T, D).permute(0, 2, 3, 1, 4).reshape(B, n_cand + 1, T, Hg * D)
    cos = F.cosine_similarity(frames[:, :n_cand].float(), frames[:, 1:].float(), dim=-1)
    scores = cos.reshape(B, n_cand, P, seg).mean(-1).flatten(1).cpu()  # [B, n_cand * P]
    if selection == "random":
        scores = torch.rand(scores.shape, generator=generator)
    elif selection == "highest":
        scores = -scores
    starts = (torch.arange(n_cand * P) // P) * T + (torch.arange(n_cand * P) % P) * seg
    m = 0 if prior_scores is None else prior_scores.shape[1]
    if m:
        scores = torch.cat([prior_scores, scores], 1)
        starts = torch.cat([torch.arange(m) * seg, starts + m * seg])
    k = min(max_segments, scores.shape[1])
    chosen = torch.sort(torch.topk(scores, k, dim=1, largest=False).indices, dim=1).values  # [B, k]
    idx = (starts[chosen][..., None] + torch.arange(seg)).flatten(1)
    return idx, scores.gather(1, chosen)


@register_policy("forcing-kv", description="AR video: Forcing-KV static/dynamic head hybrid KV compression", task="ar-video", granularity="kv")
@dataclass
class ForcingKVConfig:
    """Forcing-KV budgets, all in latent frames (or frame-equivalents of tokens).

    head_file: JSON from the head profiler; None = the pipeline's default head file (the reference
        model ships one). sink_frames >= 0. static_ctx_frames >= 0: newest frames static heads keep.
    dynamic_ring_frames >= 1: newest frames dynamic heads keep. dynamic_budget_frames >= 0: size of
        the selected-segment buffer. num_segments >= 1: segments per frame (must divide the tokens per
        frame); None = 6 (Forcing-KV's) when 6 divides the tokens per frame, else the largest divisor
        below 6. unsplit_layers: layers whose heads are all treated as static.
    selection: "lowest" (Forcing-KV: keep the lowest-similarity, most changed segments), "highest"
        or "random" (controls at the same budget; random draws from ``seed`` and the frame index, so
        runs with equal seeds are identical). keep_selected: False (Forcing-KV: the buffer is
        replaced each commit); True (our extension): the held segments compete with the new
        candidates on the scores they were chosen with, so far history can stay.
    """

    head_file: str | None = None
    sink_frames: int = 1
    static_ctx_frames: int = 1
    dynamic_ring_frames: int = 1
    dynamic_budget_frames: int = 1
    num_segments: int | None = None
    unsplit_layers: tuple = (0,)
    selection: str = "lowest"
    keep_selected: bool = False
    seed: int = 0

    def segments_for(self, tokens_per_frame: int) -> int:
        """Segments per frame: ``num_segments`` if set (it must divide the tokens per frame); None:
        Forcing-KV's 6 when it divides them, else the largest divisor below 6."""
        T = tokens_per_frame
        if self.num_segments is None:
            return next(n for n in range(6, 0, -1) if T % n == 0)
        if T % self.num_segments:
            raise ValueError(f"num_segments={self.num_segments} must divide tokens_per_frame={T}")
        return self.num_segments

    def __post_init__(self) -> None:
        for name, lo in (("sink_frames", 0), ("static_ctx_frames", 0), ("dynamic_ring_frames", 1), ("dynamic_budget_frames", 0), ("num_segments", 1)):
            val = getattr(self, name)
            if name == "num_segments" and val is None:
                continue
            if not isinstance(val, int) or isinstance(val, bool) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not isinstance(self.keep_selected, bool):
            raise ValueError(f"keep_selected must be True or False, got {self.keep_selected!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.head_file is not None and not isinstance(self.head_file, (str, os.PathLike)):
            raise ValueError(f"head_file must be a path or None, got {type(self.head_file).__name__}")
        try:
            self.unsplit_layers = tuple(int(i) for i in self.unsplit_layers)
        except (TypeError, ValueError):
            raise ValueError(f"unsplit_layers must be a sequence of layer indices, got {self.unsplit_layers!r}") from None

    def build_cache(self, layout: CacheLayout, default_head_file: str | None = None) -> ForcingKVCache:
        path = self.head_file or default_head_file
        if path is None:
            raise ValueError("forcing-kv needs head_file=...; make one with dcache.pipelines.ar_video.profiler.profile_heads")
        return ForcingKVCache(layout, self, load_head_file(path, layout.num_layers, layout.num_heads))
