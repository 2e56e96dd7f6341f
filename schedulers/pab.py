"""`pab`: Pyramid Attention Broadcast (Zhao et al., ICLR 2025, arXiv 2408.12588).

Attention outputs change little in the middle of sampling (the difference between steps is
U-shaped: large in the first and last ~15 %, flat in between), so inside a window of the loop
each attention module's output is computed once and *broadcast* (returned as it is) for the next
``range - 1`` steps. The ranges form a pyramid by stability: cross-attention is the most stable
and gets the longest range, then temporal, then spatial (VideoSys defaults for Open-Sora:
spatial 2, temporal 4, cross 6).

Which child of a block is spatial, temporal or cross attention is a model fact
(``BlockSpec.attention`` in the adapters). A range left at None takes its default when the model
has that kind of attention and is off otherwise; a range given explicitly for a kind the model
lacks is refused. Every guidance branch keeps its own outputs and counters (diffusers' PAB shares
one state across the cond and uncond calls, so with two calls per step the uncond pass receives
the cond pass's attention: shared/reference/diffusers-hooks.md §1.4).

The window is in loop progress ``p = step / num_steps`` rather than in timesteps, because
timestep scales differ between models (Flux passes sigma in [0, 1], SD 0..999); diffusers'
default window, timesteps (100, 800) of 1000, is progress (0.2, 0.9) on a linear schedule.

Example::

    pipe = dcache.accelerate(pipe, policy="pab", spatial_range=2, cross_range=6, window=(0.2, 0.9))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dcache.registry import register_policy
from dcache.schedulers._attention import AttentionHistory, AttentionPolicy
from dcache.schedulers._base import PolicyEnv, PolicyState
from dcache.schedulers._common import require_blocks
from dcache.schedulers._validate import check_bool, check_float, check_int

# VideoSys' Open-Sora pyramid (caching-algorithms.md §7, PAB).
DEFAULT_RANGES = {"spatial": 2, "temporal": 4, "cross": 6}


def progress(step: Any) -> float | None:
    """Fraction of the loop done at ``step`` (None outside a loop of known length)."""
    if step.num_steps is None or step.num_steps <= 0:
        return None
    return step.index / step.num_steps


class PABState(PolicyState):
    """Per branch: the step each attention kind was last computed at."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.last: dict[str, int] = {}


class PABPolicy(AttentionPolicy):
    history_depth = 1
    name = "pab"

    def __init__(self, config: "PABConfig", ranges: dict[str, int]) -> None:
        self.config = config
        self.ranges = ranges

    def new_state(self) -> PABState:
        return PABState()

    def reuse(self, state: PABState, step: Any, kind: str) -> bool:
        c = self.config
        p = progress(step)
        if p is None or not (c.window[0] <= p < c.window[1]) or (c.compute_last and step.is_last):
            return False
        last = state.last.get(kind)
        return last is not None and step.index - last < self.ranges[kind]

    def computed(self, state: PABState, step: Any, kind: str) -> None:
        state.last[kind] = step.index

    def produce(self, history: AttentionHistory, step: Any, kind: str) -> list | None:
        return history.values[0] if history.values else None


@register_policy("pab", description="Pyramid Attention Broadcast: reuse spatial/temporal/cross attention outputs for N steps mid-sampling", granularity="attention-output")
@dataclass
class PABConfig:
    """Pyramid Attention Broadcast.

    Args:
        spatial_range: broadcast range of spatial (self / joint) attention: computed once every
            ``spatial_range`` steps inside the window. None: 2 (VideoSys, diffusers' docs
            example) when the model has it. 0 or 1: always computed.
        temporal_range: the same for temporal attention. None: 4 when the model has it.
        cross_range: the same for cross-attention. None: 6 when the model has it.
        window: (start, end) in loop progress [0, 1]: broadcast only at steps with
            ``start <= step / num_steps < end``. Default (0.2, 0.9), diffusers' timesteps (100, 800).
        compute_last: always compute the final step (fine detail is set there).
    """

    spatial_range: int | None = None
    temporal_range: int | None = None
    cross_range: int | None = None
    window: tuple[float, float] = (0.2, 0.9)
    compute_last: bool = True

    def __post_init__(self) -> None:
        for kind in DEFAULT_RANGES:
            r = getattr(self, f"{kind}_range")
            if r is not None:
                check_int("pab", f"{kind}_range", r, 0)
        if not (isinstance(self.window, (tuple, list)) and len(self.window) == 2):
            raise ValueError(f"pab: window must be a (start, end) pair in [0, 1], got {self.window!r}")
        for v in self.window:
            check_float("pab", "window", v, 0.0, 1.0)
        if self.window[0] >= self.window[1]:
            raise ValueError(f"pab: window start must be below its end, got {tuple(self.window)!r}")
        self.window = (float(self.window[0]), float(self.window[1]))
        check_bool("pab", "compute_last", self.compute_last)

    def resolve(self, available: set[str]) -> dict[str, int]:
        """Range per kind on a model with attention kinds ``available``; refuses asked-for absent kinds."""
        ranges = {}
        for kind, default in DEFAULT_RANGES.items():
            r = getattr(self, f"{kind}_range")
            if r is None:
                ranges[kind] = default if kind in available else 0
            elif r > 0 and kind not in available:
                raise ValueError(
                    f"pab: {kind}_range={r} asked for, but this model has no {kind} attention "
                    f"(it has: {', '.join(sorted(available)) or 'none'}); leave {kind}_range unset or 0")
            else:
                ranges[kind] = r if kind in available else 0
        if not any(r > 1 for r in ranges.values()):
            raise ValueError(f"pab: every broadcast range is 0 or 1 on this model ({ranges}); nothing would be reused")
        return ranges

    def build(self, env: PolicyEnv) -> PABPolicy:
        require_blocks(env.has_blocks, env.family, "pab broadcasts attention outputs inside transformer blocks")
        kinds = getattr(env, "attention_kinds", None)
        if kinds is None:
            raise ValueError("pab needs the adapter's attention kinds (BlockSpec.attention)")
        return PABPolicy(self, self.resolve(set(kinds)))
