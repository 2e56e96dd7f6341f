"""`deepcache`: DeepCache (arXiv 2312.00858) — reuse a UNet's deep feature, run only its shallow path.

On a full step the whole UNet runs and the feature entering the up block at skip branch
``cache_branch_id`` (everything computed beneath the branch) is stored; on the other steps only
the down blocks down to the branch and the up blocks from it up run, with the stored feature in
place of the deep part. Facts: shared/reference/caching-algorithms.md §6.

Branch ids here count UNet blocks: branch b runs down block b and its partner up block on cached
steps (b = 0: only the outermost down and up blocks). DeepCache's own ids are finer
(``block_id = id // 3``, ``layer_id = id % 3``: a layer inside a block); our ``b`` is its
``block_id`` with the branch taken at the block's end, so the layer-level split is not offered.

Schedules (the source's ``uniform`` flag):

* ``uniform``: full steps ``0, N, 2N, …`` (the "1:N" strategy).
* ``non-uniform``: ``ceil(T / N)`` full steps packed densest around step ``center``:
  ``n + 1`` points ``x_k`` evenly spaced in ``[−center^(1/p), (T − center)^(1/p)]`` map to steps
  ``center + sign(x)·|x|^p`` (rounded half up); the inner ones plus step 0 are the full steps,
  and while two of them coincide ``p`` is lowered by 0.02 (p = 1 is evenly spaced, always
  distinct). This is our reading of the source's ``sample_from_quad_center`` as the reference
  describes it; its start power and centre are not given there, so ``power = 1.4`` and
  ``center = T // 2`` are our defaults.

Example::

    pipe = dcache.accelerate(sd_pipe, policy="deepcache")                         # N = 3, branch 0
    pipe = dcache.accelerate(sd_pipe, policy="deepcache", cache_interval=5, cache_branch_id=1,
                             schedule="non-uniform", center=15)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dcache.registry import register_policy
from dcache.schedulers._base import BranchPolicy, PolicyEnv, PolicyState
from dcache.schedulers._validate import check_choice, check_float, check_int

SCHEDULES = ("uniform", "non-uniform")


def full_steps(num_steps: int, interval: int, schedule: str = "uniform", center: int | None = None,
               power: float = 1.4) -> list[int]:
    """The step indices DeepCache computes in full, for a loop of ``num_steps`` steps."""
    T, N = num_steps, interval
    if schedule == "uniform" or N == 1:
        return list(range(0, T, N))
    n = -(-T // N)  # ceil: the source adds one full step when N does not divide T
    c = T // 2 if center is None else min(center, T - 1)
    p = power
    while True:
        lo, hi = -(c ** (1 / p)), (T - c) ** (1 / p)
        steps = {0}
        for k in range(n + 1):
            x = lo + (hi - lo) * k / n
            s = math.floor(c + math.copysign(abs(x) ** p, x) + 0.5)
            if 0 < s < T:
                steps.add(s)
        if len(steps) == n or p <= 1:
            return sorted(steps)
        p = max(round(p - 0.02, 10), 1.0)


class DeepCacheState(PolicyState):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.num_steps: int | None = None
        self.full: frozenset[int] = frozenset()


class DeepCachePolicy(BranchPolicy):
    def __init__(self, config: "DeepCacheConfig") -> None:
        self.config = config
        self.branch = config.cache_branch_id

    def new_state(self) -> DeepCacheState:
        return DeepCacheState()

    def decide(self, state: DeepCacheState, step: Any) -> bool:
        c = self.config
        if step.num_steps is None:  # a bare UNet outside a pipeline: the loop length is unknown
            return step.index % c.cache_interval == 0
        if state.num_steps != step.num_steps:
            state.num_steps = step.num_steps
            state.full = frozenset(full_steps(step.num_steps, c.cache_interval, c.schedule, c.center, c.power))
        return step.index in state.full


@register_policy("deepcache", description="DeepCache: reuse the UNet's deep feature, run only the shallow path",
                 granularity="unet_branch")
@dataclass
class DeepCacheConfig:
    """DeepCache for ``UNet2DConditionModel`` (SD 1.x / 2.x / SDXL).

    Args:
        cache_interval: N, one full step in every N (≥ 1; 1 computes every step).
        cache_branch_id: skip branch b (≥ 0, below the UNet's number of down blocks): cached steps
            run down blocks 0..b and the matching up blocks. Lower is faster and coarser.
        schedule: ``"uniform"`` (full steps 0, N, 2N, …) or ``"non-uniform"`` (as many full
            steps, densest around ``center``).
        center: non-uniform only: the step the full steps gather around (≥ 0); None: half the steps.
        power: non-uniform only: start power p of the spacing (≥ 1; larger packs tighter).
    """

    cache_interval: int = 3
    cache_branch_id: int = 0
    schedule: str = "uniform"
    center: int | None = None
    power: float = 1.4

    def __post_init__(self) -> None:
        check_int("deepcache", "cache_interval", self.cache_interval, 1)
        check_int("deepcache", "cache_branch_id", self.cache_branch_id, 0)
        check_choice("deepcache", "schedule", self.schedule, SCHEDULES)
        if self.center is not None:
            check_int("deepcache", "center", self.center, 0)
        check_float("deepcache", "power", self.power, 1.0)

    def build(self, env: PolicyEnv) -> DeepCachePolicy:
        if env.family != "unet":
            raise ValueError(f"deepcache works on UNet2DConditionModel (SD 1.x/2.x/SDXL); this is a {env.family} "
                             "model (for transformer block chains use 'delta-dit' or a step policy)")
        return DeepCachePolicy(self)
