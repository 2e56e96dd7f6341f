"""`foca`: forecast then calibrate, feature caching as an ODE (FoCa, arXiv 2508.16211).

Module granularity, like ``taylorseer``: the sites are the attention and MLP modules inside every
block, taken before the block applies its gates. Steps are computed on a fixed schedule (warm-up,
then every ``interval`` steps, and the last step); on the steps in between each site's output is
produced from its stored history with no model call:

* forecast: an explicit BDF2 predictor from the two most recent values of the site, cached or
  computed, ``P = 4/3 F_k - 1/3 F_{k-1} + 2h/3 F'_k``, with F'_k the derivative at the last
  computed step;
* calibrate: a Heun (trapezoidal) corrector that averages the derivative the predictor implies
  at the new step with the derivative at the last computed step, ``F_c = F_k + h/2 (F'_full + F'_P)``.

The math (and its fused kernels) is in ``dcache.kernels.foca``; equations and published numbers
from shared/reference/caching-algorithms.md §3. The paper names the full-compute interval N as
its only knob besides warm-up (N=5: 4.16x FLOPs at ImageReward 1.0029 on FLUX.1-dev, N=8: 6.24x).

Example::

    pipe = dcache.accelerate(pipe, policy="foca", interval=5, warmup_steps=3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dcache.kernels import foca as foca_ops
from dcache.registry import register_policy
from dcache.schedulers._base import Action, ModulePolicy, PolicyEnv, PolicyState
from dcache.schedulers._common import require_blocks
from dcache.schedulers._validate import check_bool, check_choice, check_int

DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FoCaState(PolicyState):
    """Per-branch schedule state: the last computed step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.computes = 0
        self.last_compute: int | None = None


def scheduled_compute(state: FoCaState, step: Any, interval: int, warmup_steps: int, compute_last: bool) -> bool:
    """Warm-up, then every ``interval`` steps, plus the last step when asked."""
    s = step.index
    return (state.last_compute is None or s < warmup_steps or (compute_last and step.is_last)
            or s - state.last_compute >= interval)


class FoCaSite:
    """One site output's history (``kernels.foca`` slots) and the steps it refers to."""

    __slots__ = ("hist", "n_full", "full_step", "cur_step", "dtype")

    def __init__(self) -> None:
        self.hist: torch.Tensor | None = None
        self.n_full = 0
        self.full_step = 0
        self.cur_step = 0
        self.dtype: torch.dtype | None = None

    def cache_nbytes(self) -> int:
        return 0 if self.hist is None else self.hist.numel() * self.hist.element_size()


class FoCaPolicy(ModulePolicy):
    def __init__(self, config: Any) -> None:
        self.config = config
        self.storage_dtype = DTYPES[config.dtype]

    def new_state(self) -> FoCaState:
        return FoCaState()

    @torch.compiler.disable
    def action(self, state: FoCaState, step: Any) -> Action:
        c = self.config
        if scheduled_compute(state, step, c.interval, c.warmup_steps, c.compute_last):
            state.computes += 1
            state.last_compute = step.index
            return Action.COMPUTE
        return Action.FORECAST

    def new_site_state(self, *name: str) -> FoCaSite:
        return FoCaSite()

    def _seed_if_new(self, site: FoCaSite, value: torch.Tensor) -> None:
        dtype = self.storage_dtype or value.dtype
        if site.hist is None or site.hist.shape[1:] != value.shape or site.hist.dtype != dtype:
            site.hist = torch.empty((foca_ops.SLOTS, *value.shape), dtype=dtype, device=value.device)
            site.n_full = 0

    @torch.compiler.disable
    def store(self, site: FoCaSite, value: torch.Tensor, step: Any) -> None:
        self._seed_if_new(site, value)
        s = step.index
        if site.n_full > 0 and s == site.cur_step:
            # A second call in the same step (a second-order scheduler's corrector): the history
            # is over steps, so it keeps the step's first value.
            return
        site.n_full = foca_ops.calibrate(site.hist, site.n_full, value.detach(), float(max(s - site.full_step, 1)))
        site.full_step = site.cur_step = s
        site.dtype = value.dtype

    def _codes(self, site: FoCaSite) -> torch.Tensor | None:
        return None  # every channel FoCa; HyCa picks per channel

    @torch.compiler.disable
    def produce(self, site: FoCaSite, step: Any) -> torch.Tensor:
        s = step.index
        codes = self._codes(site)
        if s == site.cur_step:  # the corrector call of a second-order scheduler: same value again
            if codes is None:
                return site.hist[foca_ops.CUR].to(site.dtype, copy=True)
            return foca_ops.reselect(site.hist, codes, float(s - site.full_step), site.dtype)
        h = float(s - site.cur_step)
        out = foca_ops.forecast(site.hist, h, site.dtype, codes, float(s - site.full_step))
        site.cur_step = s
        return out


@register_policy("foca", description="module-level forecast-then-calibrate (BDF2 predictor, Heun corrector) of attention/MLP outputs",
                 granularity="module")
@dataclass
class FoCaConfig:
    """FoCa.

    Args:
        interval: compute every ``interval`` steps after warm-up, forecast in between (the paper's
            N: 5 for its near-lossless FLUX row, 8 for 6.24x FLOPs).
        warmup_steps: leading steps always computed (3, as TaylorSeer's FLUX ``first_enhance``;
            the paper names warm-up as the only other knob).
        compute_last: also compute the final step (as ``taylorseer``: the last step sets fine detail).
        dtype: storage dtype of the history ("float32", "bfloat16", "float16"); None keeps the
            feature's dtype. The arithmetic is float32 either way.
    """

    interval: int = 5
    warmup_steps: int = 3
    compute_last: bool = True
    dtype: str | None = None

    def __post_init__(self) -> None:
        check_int("foca", "interval", self.interval, 1)
        check_int("foca", "warmup_steps", self.warmup_steps, 0)
        check_bool("foca", "compute_last", self.compute_last)
        check_choice("foca", "dtype", self.dtype, tuple(DTYPES))

    def build(self, env: PolicyEnv) -> FoCaPolicy:
        require_blocks(env.has_blocks, env.family, "foca forecasts module outputs inside transformer blocks")
        return FoCaPolicy(self)
