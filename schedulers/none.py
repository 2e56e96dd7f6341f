"""`none`: every step-level hook installed, nothing ever skipped — the overhead baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dcache.registry import register_policy
from dcache.schedulers._base import PolicyEnv, PolicyState, StepPolicy


class NoneState(PolicyState):
    def reset(self) -> None:
        pass


class NonePolicy(StepPolicy):
    never_reuses = True  # the installers then keep no residual or output for it

    def new_state(self) -> NoneState:
        return NoneState()

    def decide(self, state: Any, step: Any, signal: Any) -> bool:
        return True


@register_policy("none", description="hooks installed, never skips (measures dcache's own overhead)", granularity="step")
@dataclass
class NoneConfig:
    """No options. ``dcache.accelerate(pipe, policy="none")`` must give bitwise-identical output."""

    def build(self, env: PolicyEnv) -> NonePolicy:
        return NonePolicy()
