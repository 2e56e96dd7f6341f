"""How much of full attention's mass a compressed AR-video cache keeps (a diagnostic).

:class:`AttentionMassProbe` wraps any cache built by an AR-video policy. On every attention call it
also keeps the *whole* committed history of keys, computes what full attention over that history
would put on each key (softmax of the same queries, with the model's bias if any), and adds up the
mass that falls on the tokens the policy kept (its regions, per sample, plus the current chunk).
The cache itself runs unchanged, so the generation is the policy's own; the probe measures, on that
rollout, what share of full attention the policy's retained tokens cover.

``stats()`` adds ``attn_mass_kept`` (mean over layers, heads, queries and calls of the full-attention
mass on kept tokens, chunk included; 1.0 for ``kv-full``) and ``history_mass_kept`` (the same share
counted over the cached history only: kept history mass / all history mass).

Only torch is imported: policies never import model classes.
"""

from __future__ import annotations

import math

import torch

__all__ = ["AttentionMassProbe"]


class AttentionMassProbe:
    def __init__(self, cache):
        self.cache = cache
        self._hist: list[torch.Tensor | None] = [None] * cache.layout.num_layers
        self._kept = self._hist_kept = self._hist_total = 0.0
        self._n = 0

    def __getattr__(self, name):  # everything else is the wrapped cache's
        return getattr(self.cache, name)

    def _kept_mask(self, layer: int, n_hist: int, q: torch.Tensor) -> torch.Tensor:
        B, H = q.shape[0], q.shape[1]
        keep = torch.zeros(B, H, n_hist, dtype=torch.bool)
        for g in self.cache.groups[layer]:
            heads = torch.arange(H) if g.heads is None else g.heads.cpu()
            for b in range(B):
                pos = g.positions(b)
                pos = pos[(pos >= 0) & (pos < n_hist)]
                keep[b, heads[:, None], pos[None, :]] = True
        return keep.to(q.device)

    def attend(self, layer: int, q, k, v, frame_start: int, commit: bool, key_bias=None):
        T = self.cache.layout.tokens_per_frame
        hist = self._hist[layer]
        n_hist = 0 if hist is None else hist.shape[2]
        if n_hist and n_hist == frame_start * T:  # history = every frame before the chunk, in order
            K = torch.cat([hist, k], 2).float()
            logits = (q.float() @ K.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            if key_bias is not None:
                frames = torch.cat([torch.arange(n_hist) // T, torch.arange(frame_start, frame_start + k.shape[2] // T).repeat_interleave(T)])
                logits = logits + key_bias(None, frames).float()
            p = torch.softmax(logits, -1)
            keep = self._kept_mask(layer, n_hist, q)[:, :, None, :]
            ph = p[..., :n_hist]
            kept_hist = (ph * keep).sum(-1)  # [B, H, Lq]
            chunk = p[..., n_hist:].sum(-1)
            self._kept += float((kept_hist + chunk).mean())
            self._hist_kept += float(kept_hist.sum())
            self._hist_total += float(ph.sum())
            self._n += 1
        out = self.cache.attend(layer, q, k, v, frame_start, commit, key_bias=key_bias)
        if commit:
            self._hist[layer] = k.detach().clone() if hist is None else torch.cat([hist, k.detach()], 2)
        return out

    def stats(self) -> dict:
        s = self.cache.stats()
        s["attn_mass_kept"] = self._kept / self._n if self._n else 1.0
        s["history_mass_kept"] = self._hist_kept / self._hist_total if self._hist_total else 1.0
        return s
