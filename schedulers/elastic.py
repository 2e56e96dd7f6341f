"""Elastic-Cache (Nguyen-Tri et al., "Attention Is All You Need for KV Cache in Diffusion LLMs",
arXiv 2510.14973; official code github.com/yxu-dev/Elastic-Cache, read for this implementation,
``llada/generate.py`` and ``llada/model/modeling_llada.py``): refresh only when the attention of
the most-attended tokens drifts, and only the layers deeper than where it drifts.

What a step does (our paraphrase of the official LLaDA code):

* The first step is a full forward. Every layer's queries, keys, values and input hidden states
  are cached for the whole canvas.
* Each layer tracks its most-attended token: the already-decoded (or prompt) position that
  received the most attention from the window's masked queries at the last computation
  (``track_num`` of them; masked positions are never tracked).
* A cached step recomputes the tracked tokens, the tokens decoded on the previous step and the
  masked tokens of the decoding window (the sampler's current block, or its sliding window with
  ``window_length=``); every other position — far-away MASK tokens included ("block caching") —
  comes from the cache.
* Trigger, layer by layer: the tracked tokens' attention rows now (fresh queries, cache updated
  with this step's keys) are compared with their rows at the cache time (cached queries against
  the cached keys). The official code takes the cosine similarity across the head axis for every
  (tracked token, key) pair and averages it; if that falls below ``gamma`` at layer ``l``, the
  layers ``l+1 ..`` recompute **every** token from the cached inputs of layer ``l+1`` (depth-aware
  refresh); shallow layers keep their cache. Batches: a row below ``gamma`` refreshes the batch.
* There is no periodic refresh; decoding uses confidence-threshold parallel decoding
  (``threshold``, 0.9 as published) or fixed counts (``threshold=None``).

Published defaults (official ``generate_with_elastic_cache``): ``gamma=0.9``, ``track_num=1``,
sliding window 16, threshold 0.9. ``stats()['partial_refreshes']`` counts the triggered steps.

Example::

    model = dcache.accelerate(model, policy="elastic", gamma=0.9)
    out = model.generate(prompt_ids, gen_length=256, block_length=256, steps=256, window_length=16)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dcache.registry import register_policy
from dcache.schedulers._dllm_plan import Plan, StepContext


@register_policy("elastic", description="Elastic-Cache: attention-drift trigger on the most-attended tokens, "
                 "refresh from the next layer down", task="dllm", granularity="kv")
@dataclass
class ElasticConfig:
    """``gamma`` in (0, 1]: attention-similarity floor (higher = refresh more often).
    ``track_num`` >= 1: most-attended tokens tracked per layer. ``threshold``: None or a confidence
    in (0, 1] for parallel decoding (as in dual-cache)."""

    gamma: float = 0.9
    track_num: int = 1
    threshold: float | None = 0.9

    def __post_init__(self) -> None:
        if not (isinstance(self.gamma, (int, float)) and 0.0 < self.gamma <= 1.0):
            raise ValueError(f"gamma must be a float in (0, 1], got {self.gamma!r}")
        if not isinstance(self.track_num, int) or self.track_num < 1:
            raise ValueError(f"track_num must be an int >= 1, got {self.track_num!r}")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and 0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must be None or a float in (0, 1], got {self.threshold!r}")

    keep_hidden = True  # the runtime keeps every layer's input for partial recomputes

    def make_planner(self) -> "ElasticPlanner":
        return ElasticPlanner(self)


class ElasticPlanner:
    """Plans the active set and, as the model's probe, decides per layer whether to widen."""

    def __init__(self, cfg: ElasticConfig) -> None:
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        self.started = False
        self.top: dict[int, torch.Tensor] = {}    # layer -> (B, track_num) most-attended slots
        self.q: dict[int, torch.Tensor] = {}      # layer -> (B, H, L, D) rotated queries as last computed
        self.widened_at: list[int] = []            # first recomputed layer of each triggered step
        self._widened = False
        self._trigger_from: int | None = None
        self._window: torch.Tensor | None = None   # (B, L) masked queries of the decoding window
        self._past: torch.Tensor | None = None
        self._masked: torch.Tensor | None = None

    # --- plan / observe -----------------------------------------------------------------------
    def plan(self, ctx: StepContext) -> Plan:
        self._window = ctx.masked & ctx.candidates
        self._masked = ctx.masked
        self._widened = False
        self._trigger_from = None
        if not self.started:
            return Plan(full=True)
        act = self._window | ctx.decoded_prev
        for slots in self.top.values():
            act.scatter_(1, slots, True)
        return Plan(full=False, active=act, keys=ctx.attention_mask.clone())

    def observe(self, ctx: StepContext, plan: Plan) -> None:
        self.started = True

    # --- probe, called by the model forward -------------------------------------------------------
    def widen(self, layer: int) -> bool:
        if self._trigger_from is not None and layer == self._trigger_from and not self._widened:
            self._widened = True
            self.widened_at.append(layer)
            return True
        return False

    def _tracked_rows(self, active: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Row index in ``active`` of each tracked slot (they are always in the active set)."""
        hit = active[:, None, :] == slots[:, :, None]             # (B, T, A)
        return hit.float().argmax(-1)                             # (B, T)

    @staticmethod
    def _weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return s.softmax(-1)

    @staticmethod
    def _key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
        # the forward's mask is (B, 1, 1|Lq, L); the probe's rows only need the key-padding part
        return None if mask is None else mask[:, :, :1, :]

    def before_attention(self, layer: int, active: torch.Tensor | None, q: torch.Tensor, kr_old: torch.Tensor,
                         mask: torch.Tensor | None) -> None:
        self._past = None
        if active is None or self._widened or layer not in self.top or layer not in self.q:
            return
        B, H, L, D = self.q[layer].shape
        slots = self.top[layer]
        past_q = self.q[layer].gather(2, slots[:, None, :, None].expand(B, H, slots.shape[1], D))
        self._past = self._weights(past_q, kr_old, self._key_mask(mask))   # (B, H, T, L)

    def after_attention(self, layer: int, active: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                        mask: torch.Tensor | None) -> None:
        B, H, Lq, D = q.shape
        L = k.shape[2]
        km = self._key_mask(mask)
        if active is None:
            self.q[layer] = q.clone()
            qpos = torch.arange(L, device=q.device).expand(B, L)
        else:
            buf = self.q.get(layer)
            if buf is None or buf.shape[0] != B:
                buf = q.new_zeros(B, H, L, D)
            pad = torch.cat([buf, buf.new_zeros(B, H, 1, D)], 2)   # spare slot for padded entries
            pad.scatter_(2, active[:, None, :, None].expand(B, H, Lq, D), q)
            self.q[layer] = pad[:, :, :L]
            qpos = active
            if self._past is not None:
                rows = self._tracked_rows(active, self.top[layer])
                now_q = q.gather(2, rows[:, None, :, None].expand(B, H, rows.shape[1], D))
                now = self._weights(now_q, k, km)
                # official: cosine over the head axis per (tracked token, key), then the mean
                sim = F.cosine_similarity(self._past, now, dim=1).mean(dim=(1, 2))   # (B,)
                if bool((sim < self.cfg.gamma).any()) and self._trigger_from is None:
                    self._trigger_from = layer + 1
                self._past = None
        # the most-attended token for the next step: attention the window's masked queries give
        win = self._window.gather(1, qpos.clamp_max(L - 1)) & (qpos < L)   # (B, Lq)
        if not bool(win.any()):
            return
        w = self._weights(q, k, km)                                         # (B, H, Lq, L)
        recv = (w * win[:, None, :, None].to(w.dtype)).sum((1, 2))          # (B, L)
        recv = recv.masked_fill(self._masked, 0.0)   # still-masked positions are never tracked
        self.top[layer] = recv.topk(min(self.cfg.track_num, L), dim=1).indices
