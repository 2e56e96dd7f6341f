"""Fixed-capacity KV storage shared by the autoregressive-video cache policies.

A *head group* owns one preallocated K and one V tensor of shape ``[B, Hg, S + sum(caps), D]``:
``S`` slots for the chunk being denoised, then the policy's regions (sink, rings, selected
segments). Nothing is reallocated per chunk; attention reads the valid prefix in place, which is
possible because softmax attention does not depend on the order of the keys and every region is
filled before the next one starts receiving tokens (checked, with a gather fallback).

Only torch and the stdlib are imported here: policies never import model classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CacheLayout", "Region", "HeadGroup", "ARKVCache", "sdpa"]


@dataclass(frozen=True)
class CacheLayout:
    """Shapes the pipeline hands to a policy so it can allocate its cache once per generation."""

    num_layers: int
    num_heads: int
    head_dim: int
    tokens_per_frame: int
    chunk_frames: int
    num_frames: int
    batch_size: int = 1
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_frames * self.tokens_per_frame

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


class Region:
    """A contiguous slice ``[start, start + cap)`` of a group's storage, used as a ring of tokens.

    ``pos`` records the absolute token index (in the whole video) held by every slot, -1 when empty;
    it is bookkeeping for tests and for the order of evictions, kept on the CPU. A region whose
    content differs per sample (Forcing-KV's selected segments) also has ``pos_b`` (``[B, cap]``);
    ``pos`` is then sample 0's row.
    """

    def __init__(self, name: str, start: int, cap: int):
        self.name, self.start, self.cap = name, start, cap
        self.ptr = 0
        self.valid = 0
        self.pos = torch.full((cap,), -1, dtype=torch.long)
        self.pos_b: torch.Tensor | None = None

    def reset(self) -> None:
        self.ptr = 0
        self.valid = 0
        self.pos.fill_(-1)
        self.pos_b = None

    def chrono_slots(self) -> torch.Tensor:
        """Slot indices (relative to ``start``) of the valid tokens, oldest first."""
        if self.valid < self.cap:
            return torch.arange(self.valid)
        return torch.cat([torch.arange(self.ptr, self.cap), torch.arange(0, self.ptr)])


class HeadGroup:
    """K/V storage for a subset of heads (``heads=None`` means all heads, no gather needed)."""

    def __init__(self, layout: CacheLayout, heads: list[int] | None, regions: list[tuple[str, int]]):
        self.layout = layout
        self.heads = None if heads is None else torch.tensor(sorted(heads), dtype=torch.long)
        self.num_heads = layout.num_heads if heads is None else len(heads)
        self.slot = layout.chunk_tokens
        self.regions: dict[str, Region] = {}
        start = self.slot
        for name, cap in regions:
            if cap < 0:
                raise ValueError(f"region {name!r} capacity must be >= 0, got {cap}")
            self.regions[name] = Region(name, start, cap)
            start += cap
        shape = (layout.batch_size, self.num_heads, start, layout.head_dim)
        self.k = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
        self.v = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
        self.version = 0  # bumped whenever the cached keys change (keys a per-chunk mask cache)
        self._mask_key: tuple | None = None
        self._mask: torch.Tensor | None = None
        if self.heads is not None:
            self.heads = self.heads.to(layout.device)
        from dcache.kernels.kv_gather import as_head_index

        index = as_head_index(None if self.heads is None else self.heads.cpu())
        self.index = self.heads if isinstance(index, torch.Tensor) else index  # slice when contiguous

    # -- bookkeeping --------------------------------------------------------------------------
    def reset(self) -> None:
        for r in self.regions.values():
            r.reset()
        self.version += 1

    def history_bytes(self) -> int:
        """Allocated bytes of the cached history (K and V, all regions, chunk slot excluded)."""
        cap = sum(r.cap for r in self.regions.values())
        L = self.layout
        return 2 * L.batch_size * self.num_heads * cap * L.head_dim * L.itemsize

    def slot_bytes(self) -> int:
        L = self.layout
        return 2 * L.batch_size * self.num_heads * self.slot * L.head_dim * L.itemsize

    def valid_tokens(self) -> int:
        return sum(r.valid for r in self.regions.values())

    def positions(self, b: int = 0) -> torch.Tensor:
        """Absolute token positions sample ``b`` has cached, sorted (for tests and diagnostics)."""
        parts = [r.pos[r.chrono_slots()] if r.pos_b is None else r.pos_b[b][r.chrono_slots()] for r in self.regions.values()]
        return torch.sort(torch.cat(parts)).values if parts else torch.empty(0, dtype=torch.long)

    @property
    def per_sample(self) -> bool:
        return any(r.pos_b is not None for r in self.regions.values())

    # -- data movement ------------------------------------------------------------------------
    def put_chunk(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the current chunk's K/V (``[B, H, S, D]``, all heads) into the chunk slot."""
        from dcache.kernels.kv_gather import gather_heads_into

        n = k.shape[2]
        if n != self.slot:
            raise ValueError(f"chunk has {n} tokens, the cache was laid out for {self.slot}")
        gather_heads_into(self.k, k, self.index)
        gather_heads_into(self.v, v, self.index)

    def kv_for_attention(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V over the chunk slot plus every valid cached token, without copying when possible."""
        end, open_gap = self.slot, False
        contiguous = True
        for r in self.regions.values():
            if r.valid and open_gap:
                contiguous = False
                break
            end += r.valid
            open_gap = open_gap or r.valid < r.cap
        if contiguous:
            return self.k[:, :, :end], self.v[:, :, :end]
        idx = [torch.arange(self.slot)]
        idx += [r.start + torch.arange(r.valid) if r.valid < r.cap else r.start + torch.arange(r.cap) for r in self.regions.values()]
        idx = torch.cat(idx).to(self.k.device)
        return self.k.index_select(2, idx), self.v.index_select(2, idx)

    def key_frames(self, frame_start: int) -> torch.Tensor:
        """Absolute frame index of every key ``kv_for_attention`` returns, in the same order (CPU):
        ``[Lk]``, or ``[B, Lk]`` when a region's content differs per sample."""
        T, C = self.layout.tokens_per_frame, self.layout.chunk_frames
        chunk = torch.arange(frame_start, frame_start + C).repeat_interleave(T)
        if not self.per_sample:
            return torch.cat([chunk] + [r.pos[: r.valid] // T for r in self.regions.values()])
        B = self.layout.batch_size
        parts = [chunk.expand(B, -1)]
        parts += [(r.pos[: r.valid].expand(B, -1) if r.pos_b is None else r.pos_b[:, : r.valid]) // T for r in self.regions.values()]
        return torch.cat(parts, 1)

    def chunk_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, : self.slot], self.v[:, :, : self.slot]

    def region_kv(self, name: str, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.regions[name]
        idx = (r.start + slots).to(self.k.device)
        return self.k.index_select(2, idx), self.v.index_select(2, idx)

    def append(self, name: str, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Append tokens (oldest first) to ring ``name``; when more arrive than fit, the newest win."""
        r = self.regions[name]
        n = k.shape[2]
        if r.cap == 0 or n == 0:
            return
        if n > r.cap:
            k, v, pos = k[:, :, n - r.cap :], v[:, :, n - r.cap :], pos[n - r.cap :]
            n = r.cap
        first = min(n, r.cap - r.ptr)
        for (a, b), (sa, sb) in (((0, first), (r.ptr, r.ptr + first)), ((first, n), (0, n - first))):
            if b > a:
                self.k[:, :, r.start + sa : r.start + sb] = k[:, :, a:b]
                self.v[:, :, r.start + sa : r.start + sb] = v[:, :, a:b]
                r.pos[sa:sb] = pos[a:b]
        r.ptr = (r.ptr + n) % r.cap
        self.version += 1
        r.valid = min(r.cap, r.valid + n)

    def overwrite(self, name: str, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Replace the whole content of region ``name`` (used for the selected-segment buffer).
        ``pos``: ``[n]`` (same tokens for every sample) or ``[B, n]`` (each sample its own)."""
        r = self.regions[name]
        n = k.shape[2]
        if n > r.cap:
            raise ValueError(f"{n} tokens do not fit region {name!r} of capacity {r.cap}")
        self.k[:, :, r.start : r.start + n] = k
        self.v[:, :, r.start : r.start + n] = v
        r.pos.fill_(-1)
        if pos.dim() == 2:
            r.pos_b = torch.full((pos.shape[0], r.cap), -1, dtype=torch.long)
            r.pos_b[:, :n] = pos
            r.pos[:n] = pos[0]
        else:
            r.pos_b = None
            r.pos[:n] = pos
        r.valid, r.ptr = n, n % max(r.cap, 1)
        self.version += 1

    def bias_for(self, key_bias, frame_start: int, num_queries: int) -> torch.Tensor | None:
        """``key_bias`` evaluated on this group's keys, reused while the keys do not change (the
        denoising passes of a chunk and its clean pass all see the same cached keys)."""
        if key_bias is None:
            return None
        key = (frame_start, self.version, num_queries)
        if self._mask_key != key:
            self._mask = key_bias(self.index, self.key_frames(frame_start))
            self._mask_key = key
        return self._mask


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class ARKVCache:
    """Base class of the per-generation cache objects the AR-video policies build.

    The pipeline calls ``attend(layer, q, k, v, frame_start, commit)`` from every self-attention
    layer on every forward; ``q/k/v`` are ``[B, H, S, D]`` (keys post-RoPE at absolute frame
    positions). On the clean pass (``commit=True``) the chunk's K/V are committed after attending.
    """

    policy = "base"

    def __init__(self, layout: CacheLayout):
        self.layout = layout
        self.groups: list[list[HeadGroup]] = []
        self.attended_keys = 0
        self.attend_calls = 0

    # subclasses fill self.groups and implement _commit
    def _commit(self, layer: int, frame_start: int) -> None:
        raise NotImplementedError

    def begin_commit(self) -> None:
        """Called once before each clean pass (policies that share decisions across layers reset here)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_start: int, commit: bool,
               key_bias=None) -> torch.Tensor:
        """``key_bias(heads, key_frames) -> [1 or B, Hg, Lq, Lk]`` optionally adds a model-defined bias
        that depends on the cached keys' absolute frames (heads: the group's head index, None = all;
        key_frames ``[Lk]`` or, when samples cache different tokens, ``[B, Lk]``)."""
        from dcache.kernels.kv_gather import gather_heads, scatter_heads

        groups = self.groups[layer]
        if len(groups) == 1 and groups[0].heads is None:
            g = groups[0]
            g.put_chunk(k, v)
            kk, vv = g.kv_for_attention()
            self.attended_keys += kk.shape[2] * g.num_heads
            out = sdpa(q, kk, vv, g.bias_for(key_bias, frame_start, q.shape[2]))
        else:
            out = torch.empty_like(q)
            for g in groups:
                g.put_chunk(k, v)
                kk, vv = g.kv_for_attention()
                self.attended_keys += kk.shape[2] * g.num_heads
                scatter_heads(out, sdpa(gather_heads(q, g.index), kk, vv, g.bias_for(key_bias, frame_start, q.shape[2])), g.index)
        self.attend_calls += q.shape[1]
        if commit:
            self._commit(layer, frame_start)
        return out

    def reset(self) -> None:
        for gs in self.groups:
            for g in gs:
                g.reset()
        self.attended_keys = 0
        self.attend_calls = 0

    def nbytes(self) -> int:
        """Exact allocated bytes of the cached history over all layers (K and V)."""
        return sum(g.history_bytes() for gs in self.groups for g in gs)

    def slot_nbytes(self) -> int:
        return sum(g.slot_bytes() for gs in self.groups for g in gs)

    def valid_nbytes(self) -> int:
        L = self.layout
        return sum(2 * L.batch_size * g.num_heads * g.valid_tokens() * L.head_dim * L.itemsize for gs in self.groups for g in gs)

    def stats(self) -> dict:
        return {
            "policy": self.policy,
            "kv_bytes": self.nbytes(),
            "kv_valid_bytes": self.valid_nbytes(),
            "chunk_slot_bytes": self.slot_nbytes(),
            "mean_keys_per_head": (self.attended_keys / self.attend_calls) if self.attend_calls else 0.0,
        }

    # helpers for subclasses
    def _frame_positions(self, frame_start: int, frames: range) -> torch.Tensor:
        T = self.layout.tokens_per_frame
        return torch.cat([torch.arange(f * T, (f + 1) * T) for f in frames]) if len(frames) else torch.empty(0, dtype=torch.long)

    def _commit_sink_then(self, g: HeadGroup, frame_start: int, ring: str, sink_frames: int) -> None:
        """Sink frames (absolute index < sink_frames) go to the sink; the rest to ring ``ring``."""
        T, C = self.layout.tokens_per_frame, self.layout.chunk_frames
        k, v = g.chunk_kv()
        n_sink = max(0, min(C, sink_frames - frame_start))
        if n_sink:
            g.append("sink", k[:, :, : n_sink * T], v[:, :, : n_sink * T], self._frame_positions(frame_start, range(frame_start, frame_start + n_sink)))
        if n_sink < C:
            g.append(ring, k[:, :, n_sink * T :], v[:, :, n_sink * T :], self._frame_positions(frame_start, range(frame_start + n_sink, frame_start + C)))
