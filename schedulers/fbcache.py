"""`fbcache`: First-Block Cache (ParaAttention) and its Fn/Bn dual-block variant (cache-dit's DBCache).

The first ``fn_blocks`` blocks always run. Their residual is compared with the same residual at
the last fully computed step (never a skipped one, so the drift accumulates); below
``threshold`` the middle blocks are skipped and their cached residual added. The last
``bn_blocks`` blocks always run, correcting what the reused span got wrong.

Example::

    pipe = dcache.accelerate(pipe, policy="fbcache", threshold=0.08)
    pipe = dcache.accelerate(pipe, policy="fbcache", fn_blocks=2, bn_blocks=1)   # dual-block
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dcache.kernels.rel_l1 import rel_l1, rel_l1_rows
from dcache.registry import register_policy
from dcache.schedulers._base import PolicyEnv, PolicyState, StepPolicy
from dcache.schedulers._validate import check_bool, check_float, check_int


class FBCacheState(PolicyState):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.reference: torch.Tensor | None = None
        self.consecutive = 0
        self.last_distance: float | None = None

    def cache_nbytes(self) -> int:
        r = self.reference
        return 0 if r is None else r.numel() * r.element_size()


class FBCachePolicy(StepPolicy):
    def __init__(self, config: "FBCacheConfig") -> None:
        self.config = config
        self.head_blocks = config.fn_blocks
        self.tail_blocks = config.bn_blocks
        self.per_sample = config.per_sample

    def new_state(self) -> FBCacheState:
        return FBCacheState()

    @torch.compiler.disable
    def decide(self, state: FBCacheState, step: Any, signal: torch.Tensor | None) -> Any:
        if self.per_sample:
            return self._decide_rows(state, step, signal)
        c = self.config
        reuse = False
        if state.reference is not None and state.reference.shape == signal.shape and step.index >= c.warmup_steps:
            d = float(rel_l1(signal, state.reference, self.group))
            state.last_distance = d
            limit_ok = c.max_consecutive == 0 or state.consecutive < c.max_consecutive
            reuse = d < c.threshold and limit_ok
        if reuse:
            state.consecutive += 1
            return False
        state.reference = signal.detach()
        state.consecutive = 0
        return True

    def _decide_rows(self, state: FBCacheState, step: Any, signal: torch.Tensor) -> Any:
        """One reference per batch row: a row's reference moves only when that row is computed."""
        c = self.config
        ref = state.reference
        if ref is None or ref.shape != signal.shape or step.index < c.warmup_steps:
            state.reference = signal.detach().clone()
            state.consecutive = torch.zeros(signal.shape[0], dtype=torch.long)
            return True
        d = rel_l1_rows(signal, ref, self.group).cpu()
        state.last_distance = d
        reuse = d < c.threshold
        if c.max_consecutive:
            reuse &= state.consecutive < c.max_consecutive
        state.consecutive = torch.where(reuse, state.consecutive + 1, torch.zeros_like(state.consecutive))
        compute = ~reuse
        rows = compute.nonzero().flatten().to(signal.device)
        state.reference[rows] = signal.detach()[rows]
        return compute


@register_policy("fbcache", description="first-block residual test against the last full step; Fn/Bn dual-block variant", granularity="step")
@dataclass
class FBCacheConfig:
    """First-Block Cache.

    Args:
        threshold: relative-L1 change of the first blocks' residual below which the rest is reused
            (ParaAttention's FLUX default 0.08; diffusers uses 0.05).
        fn_blocks: leading blocks always computed; their residual is the change signal (≥ 1).
        bn_blocks: trailing blocks always computed after the reused span (≥ 0).
        warmup_steps: leading steps always computed.
        max_consecutive: cap on consecutive reused steps (0 = no cap).
        per_sample: one reference and decision per batch row: changed rows are computed, the
            others reuse (default: one decision for the whole batch).
    """

    threshold: float = 0.08
    fn_blocks: int = 1
    bn_blocks: int = 0
    warmup_steps: int = 1
    max_consecutive: int = 0
    per_sample: bool = False

    def __post_init__(self) -> None:
        check_float("fbcache", "threshold", self.threshold, 0.0)
        check_int("fbcache", "fn_blocks", self.fn_blocks, 1)
        check_int("fbcache", "bn_blocks", self.bn_blocks, 0)
        check_int("fbcache", "warmup_steps", self.warmup_steps, 0)
        check_int("fbcache", "max_consecutive", self.max_consecutive, 0)
        check_bool("fbcache", "per_sample", self.per_sample)

    def build(self, env: PolicyEnv) -> FBCachePolicy:
        if not env.has_blocks:
            raise ValueError(f"fbcache needs a transformer block chain; {env.family} models support: none, static, teacache")
        if self.fn_blocks + self.bn_blocks >= env.num_blocks:
            raise ValueError(
                f"fbcache: fn_blocks + bn_blocks must be less than the model's {env.num_blocks} blocks, "
                f"got {self.fn_blocks} + {self.bn_blocks}"
            )
        return FBCachePolicy(self)
