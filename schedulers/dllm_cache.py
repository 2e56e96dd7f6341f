"""Fast-dLLM block-wise approximate KV cache (Wu et al., arXiv 2505.22618): prefix and dual cache,
with confidence-threshold parallel decoding.

Each semi-autoregressive block starts with a full forward that refreshes the whole cache. The
remaining steps of the block recompute only

* ``prefix-cache``: the current block and everything after it (the prefix comes from the cache);
* ``dual-cache``:   the current block (prefix *and* masked suffix come from the cache; the block's
  own K/V are replaced in place each step).

With ``threshold`` set, every masked token of the block whose confidence is ≥ threshold is
committed at once (at least one per step), so a block often takes a few steps instead of
``block_length``. ``threshold=None`` keeps the sampler's fixed per-step counts. Paper default 0.9.

Example::

    model = dcache.accelerate(model, policy="dual-cache", threshold=0.9)
    out = model.generate(prompt_ids, gen_length=256, block_length=32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcache.registry import register_policy
from dcache.schedulers._dllm_plan import Plan, StepContext


def _check_threshold(t: float | None) -> None:
    if t is not None and not (isinstance(t, (int, float)) and 0.0 < t <= 1.0):
        raise ValueError(f"threshold must be None or a float in (0, 1], got {t!r}")


@dataclass
class _BlockCacheConfig:
    threshold: float | None = 0.9

    def __post_init__(self) -> None:
        _check_threshold(self.threshold)

    def make_planner(self) -> "BlockCachePlanner":
        return BlockCachePlanner(dual=self.policy_name == "dual-cache")


@register_policy("prefix-cache", description="Fast-dLLM prefix KV cache per block, threshold parallel decoding",
                 task="dllm", granularity="kv")
@dataclass
class PrefixCacheConfig(_BlockCacheConfig):
    """``threshold``: None (fixed counts) or a confidence in (0, 1] for parallel decoding."""


@register_policy("dual-cache", description="Fast-dLLM dual (prefix+suffix) KV cache per block, threshold parallel decoding",
                 task="dllm", granularity="kv")
@dataclass
class DualCacheConfig(_BlockCacheConfig):
    """``threshold``: None (fixed counts) or a confidence in (0, 1] for parallel decoding."""


class BlockCachePlanner:
    def __init__(self, dual: bool) -> None:
        self.dual = dual
        self.reset()

    def reset(self) -> None:
        self._block: tuple[int, int] | None = None

    def plan(self, ctx: StepContext) -> Plan:
        if ctx.block != self._block:
            return Plan(full=True)
        s, e = ctx.block
        act = torch.zeros_like(ctx.masked)
        keys = ctx.attention_mask.clone()
        if self.dual:
            act[:, s:e] = True
        else:
            act[:, s:] = True
            keys[:, s:] = False
        return Plan(full=False, active=act, keys=keys)

    def observe(self, ctx: StepContext, plan: Plan) -> None:
        self._block = ctx.block
