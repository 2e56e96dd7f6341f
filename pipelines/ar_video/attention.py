"""Attention processors and RoPE that turn diffusers' WanTransformer3DModel into a causal model.

* :class:`FrameOffsetRope` replaces ``transformer.rope`` and reads the absolute frame index of each
  latent frame from a shared :class:`RunContext`, so cached keys keep their absolute temporal phase.
* :class:`CausalSelfAttnProcessor` (on every ``attn1``) projects, RMS-normalises and rotates q/k,
  then either attends through the policy's KV cache (chunk mode) or runs dense attention with a
  frame-level mask (reference / training mode).
* :class:`CachedCrossAttnProcessor` (on every ``attn2``) computes the text K/V once per generation.

The blocks, projections, norms, FFN and modulation are diffusers' own modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RunContext", "RecencyBias", "FrameOffsetRope", "RopeTables", "rotate", "CausalSelfAttnProcessor", "CachedCrossAttnProcessor", "apply_rope"]


@dataclass
class RunContext:
    """State shared by the rope and the processors of one transformer during a forward."""

    frame_positions: torch.Tensor | None = None  # absolute frame index of every input frame
    mode: str = "dense"  # "dense" (mask or none) | "cache"
    frame_mask: torch.Tensor | None = None  # [F, F] bool, True = may attend (dense mode)
    tokens_per_frame: int = 0
    cache: Any = None
    commit: bool = False
    frame_start: int = 0
    cross_cache: dict = field(default_factory=dict)  # layer -> (k, v)
    cross_cache_on: bool = False
    recorder: Any = None  # head profiler hook: called with (layer, q, k, additive bias or None) in dense mode
    recency: Any = None  # RecencyBias of the model, or None (plain Wan attention)


class FrameOffsetRope(nn.Module):
    """Wan 3D RoPE whose temporal index comes from ``ctx.frame_positions`` instead of ``0..F-1``.

    Uses the frequency tables of the wrapped ``WanRotaryPosEmbed`` (same t/h/w split), so with
    positions ``0..F-1`` it returns exactly what the original module returns.
    """

    def __init__(self, inner: nn.Module, ctx: RunContext):
        super().__init__()
        self.inner = inner
        self.ctx = ctx

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.inner
        _, _, nf, h, w = hidden_states.shape
        pt, ph, pw = r.patch_size
        f, hh, ww = nf // pt, h // ph, w // pw
        pos = self.ctx.frame_positions
        if pos is None:
            pos = torch.arange(f)
        if pos.numel() != f:
            raise ValueError(f"frame_positions has {pos.numel()} entries for {f} latent frames")
        pos = pos.to(r.freqs_cos.device)
        out = []
        for table in (r.freqs_cos, r.freqs_sin):
            t, hd, wd = table.split([r.t_dim, r.h_dim, r.w_dim], dim=1)
            parts = (
                t[pos].view(f, 1, 1, -1).expand(f, hh, ww, -1),
                hd[:hh].view(1, hh, 1, -1).expand(f, hh, ww, -1),
                wd[:ww].view(1, 1, ww, -1).expand(f, hh, ww, -1),
            )
            out.append(torch.cat(parts, dim=-1).reshape(1, f * hh * ww, 1, -1))
        return RopeTables(out[0], out[1])


class RopeTables(tuple):
    """``(cos, sin)`` as diffusers' blocks pass them on, plus the same rotation as complex numbers,
    built once per forward: one complex multiply per q/k then replaces six elementwise kernels."""

    def __new__(cls, cos: torch.Tensor, sin: torch.Tensor):
        self = super().__new__(cls, (cos, sin))
        self.cplx = torch.complex(cos[..., 0::2].float(), sin[..., 1::2].float())
        return self


def rotate(x: torch.Tensor, rotary_emb) -> torch.Tensor:
    """Apply the RoPE of one forward to ``x`` ([B, L, H, D])."""
    cplx = getattr(rotary_emb, "cplx", None)
    if cplx is None:
        return apply_rope(x, *rotary_emb)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * cplx).flatten(-2).type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ([B, L, H, D]) by Wan's real-valued cos/sin tables."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


class RecencyBias:
    """A per-head attention bias that decays with temporal distance: ``-slope[layer, head] * (f_q - f_k)``
    for keys in earlier frames, 0 for keys in the query's own or later frames and for sink frames.

    An ALiBi-style recency prior over latent frames (Press et al., ALiBi, arXiv 2108.12409, applied to
    frames). Wan has none; the reference model uses it to *plant* the head roles that Forcing-KV finds
    in real Self-Forcing models (local "static" heads with a steep slope, "dynamic" heads with a
    shallow one), which a CPU-trained toy model does not learn by itself. Stored as
    ``temporal_bias.json``: ``{"slopes": [[per head] per layer], "sink_frames": n}``.
    """

    def __init__(self, slopes, sink_frames: int = 1):
        self.slopes = torch.as_tensor(slopes, dtype=torch.float32)
        if self.slopes.dim() != 2 or (self.slopes < 0).any():
            raise ValueError(f"recency slopes must be a [layers][heads] list of values >= 0, got shape {tuple(self.slopes.shape)}")
        self._given = self.slopes.tolist() if isinstance(slopes, torch.Tensor) else [[float(x) for x in row] for row in slopes]
        if not isinstance(sink_frames, int) or sink_frames < 0:
            raise ValueError(f"sink_frames must be an int >= 0, got {sink_frames!r}")
        self.sink_frames = sink_frames

    def to_dict(self) -> dict:
        return {"slopes": self._given, "sink_frames": self.sink_frames}

    def __call__(self, layer: int, heads, q_frames: torch.Tensor, k_frames: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[1, Hg, Lq, Lk] additive bias for query/key token frame indices (4-D: with a 3-D mask
        torch's CPU SDPA falls back from its flash kernel to the math path, 2-3x slower).
        ``k_frames`` of shape ``[B, Lk]`` (samples caching different tokens) gives ``[B, Hg, Lq, Lk]``."""
        s = self.slopes[layer]
        if heads is not None:
            s = s[heads.cpu() if isinstance(heads, torch.Tensor) else heads]
        kf = k_frames if k_frames.dim() == 2 else k_frames[None]
        dist = (q_frames[None, :, None] - kf[:, None, :]).clamp_min(0).to(torch.float32)
        dist = dist.masked_fill((kf < self.sink_frames)[:, None, :], 0.0)
        return (-s.to(dist.device)[None, :, None, None] * dist[:, None]).to(dtype)


def expand_frame_mask(frame_mask: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """[F, F] or per-sample [B, F, F] frame mask -> token mask broadcastable to [B, H, L, L]."""
    m = frame_mask.repeat_interleave(tokens_per_frame, -2).repeat_interleave(tokens_per_frame, -1)
    return m[:, None] if m.dim() == 3 else m


class CausalSelfAttnProcessor:
    """Self-attention for layer ``layer`` of a causal Wan model (see module docstring)."""

    def __init__(self, layer: int, ctx: RunContext):
        self.layer = layer
        self.ctx = ctx

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        ctx = self.ctx
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = rotate(q, rotary_emb), rotate(k, rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        rec = ctx.recency
        if ctx.mode == "cache":
            bias = None
            if rec is not None:
                pos = ctx.frame_positions

                def bias(heads, k_frames, _layer=self.layer):  # called only when the cache's keys changed
                    q_frames = pos.repeat_interleave(q.shape[2] // pos.numel()).to(q.device)
                    return rec(_layer, heads, q_frames, k_frames.to(q.device), q.dtype)

            out = ctx.cache.attend(self.layer, q, k, v, ctx.frame_start, ctx.commit, key_bias=bias)
        else:
            mask = None
            if ctx.frame_mask is not None:
                mask = expand_frame_mask(ctx.frame_mask, ctx.tokens_per_frame).to(q.device)
            if rec is not None:
                pos = ctx.frame_positions if ctx.frame_positions is not None else torch.arange(q.shape[2] // ctx.tokens_per_frame)
                frames = pos.repeat_interleave(q.shape[2] // pos.numel()).to(q.device)
                bias = rec(self.layer, None, frames, frames, q.dtype)  # [1, H, L, L]
                mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
            if ctx.recorder is not None:
                ctx.recorder(self.layer, q, k, mask if rec is not None else None)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


class CachedCrossAttnProcessor:
    """Text cross-attention whose K/V are computed on the first call of a generation and reused."""

    def __init__(self, layer: int, ctx: RunContext):
        self.layer = layer
        self.ctx = ctx

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        ctx = self.ctx
        cached = ctx.cross_cache.get(self.layer) if ctx.cross_cache_on else None
        if cached is None:
            k = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            v = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            if ctx.cross_cache_on:
                ctx.cross_cache[self.layer] = (k, v)
        else:
            k, v = cached
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))
