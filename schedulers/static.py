"""`static`: compute every N-th step, reuse the block-chain residual in between (FORA-style).

Example::

    pipe = dcache.accelerate(pipe, policy="static", interval=3, warmup_steps=2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dcache.kernels import taylor
from dcache.registry import register_policy
from dcache.schedulers._base import PolicyEnv, PolicyState, StepPolicy
from dcache.schedulers._validate import check_bool, check_int


class StaticState(PolicyState):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.last_compute: int | None = None


class StaticPolicy(StepPolicy):
    def __init__(self, config: "StaticConfig") -> None:
        self.config = config
        self.residual_order = config.residual_order
        self.difference_from = config.difference_from

    def new_state(self) -> StaticState:
        return StaticState()

    def decide(self, state: StaticState, step: Any, signal: Any) -> bool:
        c = self.config
        compute = (
            state.last_compute is None
            or step.index < c.warmup_steps
            or (c.compute_last and step.is_last)
            or step.index - state.last_compute >= c.interval
        )
        if compute:
            state.last_compute = step.index
        return compute


@register_policy("static", description="compute every N-th step, reuse the residual between (FORA-style)", granularity="step")
@dataclass
class StaticConfig:
    """Fixed-interval step caching.

    Args:
        interval: compute one step in every ``interval`` (≥ 1; 1 computes every step).
        warmup_steps: leading steps always computed (≥ 0).
        compute_last: always compute the final step, which sets fine detail.
        residual_order: 0 reuses the last computed residual (FORA); k > 0 adds its order-k
            Taylor forecast over the step index from the computed steps instead.
        difference_from: with ``residual_order`` > 0, computed steps before this index refresh
            the residual but form no difference (default 3, as ``fbcache``).
    """

    interval: int = 3
    warmup_steps: int = 1
    compute_last: bool = True
    residual_order: int = 0
    difference_from: int = 3

    def __post_init__(self) -> None:
        check_int("static", "interval", self.interval, 1)
        check_int("static", "warmup_steps", self.warmup_steps, 0)
        check_bool("static", "compute_last", self.compute_last)
        check_int("static", "residual_order", self.residual_order, 0, taylor.MAX_TERMS - 1)
        check_int("static", "difference_from", self.difference_from, 0)

    def build(self, env: PolicyEnv) -> StaticPolicy:
        return StaticPolicy(self)
