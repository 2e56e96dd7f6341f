"""Elastic-Cache-style refresh (Nguyen-Tri et al., arXiv 2510.14973): refresh only when the
most-attended token drifts, and only from the depth where it drifts.

The paper's observations: the token that receives the most attention drifts least, so its drift
is a conservative signal for everyone; and drift grows with depth, so shallow layers can keep
their cache. Our reading of the mechanism (the paper's code was not available to us):

* After the first full forward every position's K/V (MASK tokens included) and every layer's
  input hidden states are cached. A step recomputes only the masked tokens of the current block,
  the tokens decoded on the previous step, and the tracked most-attended tokens.
* At each layer ``l`` of a cached step, the most-attended token of that layer (the key slot that
  received the largest attention from the active queries on the previous step, averaged over
  heads and queries) is among the recomputed tokens; its fresh key is compared with its cached
  key. If the cosine similarity of any row falls below ``gamma``, every token is recomputed from
  layer ``l`` on, starting from the cached inputs of layer ``l`` (shallow layers are reused).
* ``max_interval`` (optional) forces a full refresh after that many steps without one.

Example::

    model = dcache.accelerate(model, policy="elastic", gamma=0.9)
    out = model.generate(prompt_ids, gen_length=256, block_length=32, steps=256)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcache.registry import register_policy
from dcache.schedulers._dllm_plan import Plan, StepContext


@register_policy("elastic", description="Elastic-Cache: refresh from the depth where the most-attended token drifts",
                 task="dllm", granularity="kv")
@dataclass
class ElasticConfig:
    """``gamma`` in (0, 1]: cosine-similarity floor of the most-attended token's key (higher =
    refresh more often). ``max_interval``: None or an int >= 1, steps between forced full refreshes.
    ``threshold``: None or a confidence in (0, 1] for parallel decoding (as in dual-cache)."""

    gamma: float = 0.9
    max_interval: int | None = None
    threshold: float | None = 0.9

    def __post_init__(self) -> None:
        if not (isinstance(self.gamma, (int, float)) and 0.0 < self.gamma <= 1.0):
            raise ValueError(f"gamma must be a float in (0, 1], got {self.gamma!r}")
        if self.max_interval is not None and (not isinstance(self.max_interval, int) or self.max_interval < 1):
            raise ValueError(f"max_interval must be None or an int >= 1, got {self.max_interval!r}")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and 0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must be None or a float in (0, 1], got {self.threshold!r}")

    keep_hidden = True  # the runtime keeps every layer's input for partial recomputes

    def make_planner(self) -> "ElasticPlanner":
        return ElasticPlanner(self)


class ElasticPlanner:
    def __init__(self, cfg: ElasticConfig) -> None:
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        self.started = False
        self.since_full = 0
        self.top: dict[int, torch.Tensor] = {}   # layer -> (B,) most-attended slot
        self.widened_at: list[int] = []           # depth of each drift-triggered refresh
        self._widened = False

    # --- plan / observe -----------------------------------------------------------------------
    def plan(self, ctx: StepContext) -> Plan:
        mi = self.cfg.max_interval
        if not self.started or (mi is not None and self.since_full >= mi):
            return Plan(full=True)
        s, e = ctx.block
        act = torch.zeros_like(ctx.masked)
        act[:, s:e] = ctx.masked[:, s:e]
        act |= ctx.decoded_prev
        for slot in self.top.values():
            act.scatter_(1, slot[:, None], True)
        self._widened = False
        return Plan(full=False, active=act, keys=ctx.attention_mask.clone())

    def observe(self, ctx: StepContext, plan: Plan) -> None:
        self.started = True
        self.since_full = 0 if (plan.full or self._widened) else self.since_full + 1

    # --- probe, called by the model forward on cached steps ----------------------------------------
    def widen(self, layer: int, active: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              kbuf: torch.Tensor, vbuf: torch.Tensor) -> bool:
        if self._widened or layer not in self.top:
            return False
        slot = self.top[layer]                                  # (B,)
        hit = active == slot[:, None]                           # (B, A)
        if not bool(hit.any(1).all()):
            return False
        j = hit.float().argmax(1)                               # row position of the slot in active
        B, H, _, D = k.shape
        fresh = k.gather(2, j.view(B, 1, 1, 1).expand(B, H, 1, D))[:, :, 0]
        old = kbuf.gather(2, slot.view(B, 1, 1, 1).expand(B, H, 1, D))[:, :, 0]
        sim = torch.nn.functional.cosine_similarity(fresh.flatten(1), old.flatten(1), dim=1)
        if bool((sim < self.cfg.gamma).any()):
            self._widened = True
            self.widened_at.append(layer)
            return True
        return False

    def attention(self, layer: int, active: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  mask: torch.Tensor | None) -> None:
        B, H, A, D = q.shape
        Hk = k.shape[1]
        if Hk != H:
            k = k.repeat_interleave(H // Hk, dim=1)
        s = (q @ k.transpose(-1, -2)) / D ** 0.5
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        w = s.softmax(-1)
        valid_q = (active < k.shape[2]).to(w.dtype)[:, None, :, None]
        recv = (w * valid_q).sum((1, 2))                        # (B, L) attention received
        recv.scatter_(1, active.clamp_max(k.shape[2] - 1), 0.0)  # the tracked token must be a cached one
        self.top[layer] = recv.argmax(1)
