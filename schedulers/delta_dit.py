"""`delta-dit`: Δ-DiT's stage-adaptive Δ-Cache (arXiv 2406.01125) on a transformer block chain.

Front blocks shape outlines, rear blocks shape details (the paper's finding). So in the early
stage of sampling (step index < ``boundary`` · steps) the **rear** ``num_cached_blocks`` blocks
are Δ-cached, and in the late stage the **front** ones are. Δ-Cache reuses the offset
``F(x) − x`` and adds it to the current input (facts: shared/reference/caching-algorithms.md §7);
the block installer does this per block, and a chain of per-block offsets reused on consecutive
blocks adds up to the group's offset ``F_group(x) − x`` of the last full step, on the current
input. One step in every ``interval`` is a full step (every block computed, offsets refreshed).

The source names the hyper-parameters (boundary b, interval N, cached blocks N_c) but our
reference gives no defaults; ours are: half the steps, N = 2 (the FLUX table's "Δ-DiT (N=2)"
row), half the blocks.

Example::

    pipe = dcache.accelerate(pipe, policy="delta-dit")                                  # defaults
    pipe = dcache.accelerate(pipe, policy="delta-dit", boundary=0.4, interval=3, num_cached_blocks=2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dcache.registry import register_policy
from dcache.schedulers._base import BlockPolicy, PolicyEnv, PolicyState
from dcache.schedulers._validate import check_float, check_int


class DeltaDiTState(PolicyState):
    """Which step the decisions belong to and the last full step (one per guidance branch)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.step: int | None = None
        self.full = True
        self.last_full: int | None = None


class DeltaDiTPolicy(BlockPolicy):
    def __init__(self, config: "DeltaDiTConfig", num_blocks: int) -> None:
        self.config = config
        self.num_blocks = num_blocks
        self.cached = config.num_cached_blocks if config.num_cached_blocks is not None else max(num_blocks // 2, 1)

    def new_state(self) -> DeltaDiTState:
        return DeltaDiTState()

    def blocks(self, num_blocks: int) -> list[int]:
        front = set(range(self.cached))
        rear = set(range(num_blocks - self.cached, num_blocks))
        return sorted(front | rear)

    def early(self, step: Any) -> bool:
        """Early stage (t > b in the paper): the rear blocks are the cached ones."""
        if step.num_steps is None:  # a bare model outside a pipeline: the length is unknown
            return True
        return step.index < round(self.config.boundary * step.num_steps)

    def cached_blocks(self, step: Any) -> range:
        n, k = self.num_blocks, self.cached
        return range(n - k, n) if self.early(step) else range(0, k)

    def decide(self, state: DeltaDiTState, step: Any, index: int, hidden: torch.Tensor) -> bool:
        if state.step != step.index:  # first hooked block of this step: is it a full step?
            state.step = step.index
            state.full = state.last_full is None or step.index - state.last_full >= self.config.interval
            if state.full:
                state.last_full = step.index
        return state.full or index not in self.cached_blocks(step)


@register_policy("delta-dit", description="Δ-DiT: Δ-cache the rear blocks early in sampling, the front blocks late",
                 granularity="block")
@dataclass
class DeltaDiTConfig:
    """Stage-adaptive Δ-Cache (Δ-DiT, arXiv 2406.01125).

    Args:
        boundary: fraction of the steps in the early stage (rear blocks cached); the rest is the
            late stage (front blocks cached). In [0, 1]: 0 caches only front blocks, 1 only rear.
        interval: one full step (every block computed) in every ``interval`` steps (≥ 1; 1
            computes everything).
        num_cached_blocks: blocks in the cached group (front or rear), ≥ 1 and at most the
            model's block count; None: half the blocks.
    """

    boundary: float = 0.5
    interval: int = 2
    num_cached_blocks: int | None = None

    def __post_init__(self) -> None:
        check_float("delta-dit", "boundary", self.boundary, 0.0, 1.0)
        check_int("delta-dit", "interval", self.interval, 1)
        if self.num_cached_blocks is not None:
            check_int("delta-dit", "num_cached_blocks", self.num_cached_blocks, 1)

    def build(self, env: PolicyEnv) -> DeltaDiTPolicy:
        if not env.has_blocks:
            raise ValueError(f"delta-dit needs a transformer block chain; the {env.family} model has none "
                             "(for a UNet use 'deepcache')")
        if self.num_cached_blocks is not None and self.num_cached_blocks > env.num_blocks:
            raise ValueError(f"delta-dit: num_cached_blocks must be in [1, {env.num_blocks}] for this model "
                             f"({env.num_blocks} blocks), got {self.num_cached_blocks}")
        return DeltaDiTPolicy(self, env.num_blocks)
