"""Runs a policy's plans against a model: the glue between schedulers' planners and the forward.

:class:`CachedForward` owns the per-run :class:`KVCache`, turns a plan's boolean masks into
padded index tensors (rows may have different active counts), and keeps the statistics exposed
as ``model.dcache.stats()``.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.pipelines.dllm.modeling import KVCache
from dcache.schedulers._dllm_plan import Plan, StepContext

__all__ = ["DLLMCacheHandle", "CachedForward", "mask_to_index"]


def mask_to_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool → (B, A) long indices of the True slots, padded with L (A = max row count)."""
    B, L = mask.shape
    counts = mask.sum(1)
    A = max(int(counts.max()), 1)
    # stable sort puts True slots first, in canvas order
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :A]
    keep = torch.arange(A, device=mask.device)[None] < counts[:, None]
    return torch.where(keep, order, torch.full_like(order, L))


class DLLMCacheHandle:
    """``model.dcache``: statistics of the runs since the last ``reset()``."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.forwards = 0
        self.full_forwards = 0
        self.tokens_computed = 0
        self.tokens_canvas = 0
        self.peak_cache_bytes = 0
        self.runs = 0
        self.partial_refreshes = 0

    def stats(self) -> dict[str, Any]:
        frac = self.tokens_computed / self.tokens_canvas if self.tokens_canvas else 1.0
        return {
            "policy": getattr(self.config, "policy_name", None),
            "runs": self.runs,
            "nfe": self.forwards,
            "full_forwards": self.full_forwards,
            "cached_forwards": self.forwards - self.full_forwards,
            "token_fraction_computed": frac,
            "est_speedup": 1.0 / frac if frac > 0 else float("inf"),
            "partial_refreshes": self.partial_refreshes,
            "peak_cache_bytes": self.peak_cache_bytes,
        }


class CachedForward:
    """One generation's forward under a policy (or plain, with ``config=None``)."""

    def __init__(self, model: Any, config: Any | None, handle: DLLMCacheHandle | None) -> None:
        self.model = model
        self.planner = config.make_planner() if config is not None else None
        self.handle = handle
        self.cache = KVCache(keep_hidden=bool(getattr(config, "keep_hidden", False)))
        if self.planner is not None and hasattr(self.planner, "widen"):
            self.cache.probe = self.planner
        self.nfe = 0
        if handle is not None:
            handle.runs += 1

    def __call__(self, ctx: StepContext, need: torch.Tensor, position_ids: torch.Tensor):
        """Logits for the positions ``need`` (B, L) requires; returns (logits (B, A, V), index (B, A)) where
        ``index`` gives the canvas position each logit row predicts (L = padding)."""
        x, am = ctx.x, ctx.attention_mask
        B, L = x.shape
        shift = self.model.logits_shift
        self.nfe += 1
        plan = self.planner.plan(ctx) if self.planner is not None else Plan(full=True, store=False)
        if plan.canvas is not None:
            x = plan.canvas
        if plan.full:
            out = self.model(x, am.long(), position_ids, cache=self.cache if (self.planner and plan.store) else None,
                             attn_mask=plan.attn_mask)
            logits = out.logits
            if shift:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
            idx = torch.arange(L, device=x.device).expand(B, L)
            computed = B * L
        else:
            act = plan.active.clone()
            # the sampler needs logits for `need`; with Dream's shift those come from one slot earlier
            q_need = torch.roll(need, -shift, dims=1) if shift else need
            if shift:
                q_need[:, -1] = False
            act |= q_need
            act &= am
            qidx = mask_to_index(act)
            out = self.model(x, am.long(), position_ids, active=qidx, cache=self.cache, key_mask=plan.keys & am)
            logits = out.logits
            idx = torch.where(qidx < L, qidx + shift, qidx).clamp_max(L)
            computed = int(act.sum())
            if getattr(self.planner, "_widened", False):
                depth = self.planner.widened_at[-1]
                n = len(self.model._layer_parts())
                computed += int((B * L - computed) * (n - depth) / n)
                if self.handle is not None:
                    self.handle.partial_refreshes += 1
        if self.planner is not None:
            self.planner.observe(ctx, plan)
        h = self.handle
        if h is not None:
            h.forwards += 1
            h.full_forwards += int(plan.full)
            h.tokens_computed += computed
            h.tokens_canvas += B * L
            h.peak_cache_bytes = max(h.peak_cache_bytes, self.cache.nbytes())
        return logits, idx

    def close(self) -> None:
        self.cache.reset()
        if self.planner is not None:
            self.planner.reset()
