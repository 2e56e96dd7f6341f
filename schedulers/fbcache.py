"""`fbcache`: First-Block Cache (ParaAttention) and its Fn/Bn dual-block variant (cache-dit's DBCache).

The first ``fn_blocks`` blocks always run. Their residual is compared with the same residual at
the last fully computed step (never a skipped one, so the drift accumulates); below
``threshold`` the middle blocks are skipped and their cached residual added. The last
``bn_blocks`` blocks always run, correcting what the reused span got wrong.

Parity with cache-dit's DBCache (``cache_manager.can_cache``, shared/reference/cache-dit.md): the
checks run in its order — warm-up steps ``range(0, warmup_steps, warmup_interval)`` (cut to the
mask's leading 1s when a mask is given), then ``steps_mask`` (1 = compute; 0 = may cache: the
threshold still decides under ``steps_policy="dynamic"``, it caches outright under "static"),
then ``max_cached_steps``, then ``max_consecutive``, then the relative-L1 test
``mean|R_prev - R| / mean|R_prev|`` on the Fn residual. At the same settings the two compute the
same steps (``tests/policies/test_fbcache_parity.py`` runs both on a tiny Flux pipeline).
Mapping: ``Fn_compute_blocks`` = ``fn_blocks``, ``Bn_compute_blocks`` = ``bn_blocks``,
``max_warmup_steps`` = ``warmup_steps``, ``max_continuous_cached_steps`` = ``max_consecutive``
(cache-dit's -1 = our 0), ``steps_computation_mask`` / ``_policy`` = ``steps_mask`` / ``steps_policy``.

Example::

    pipe = dcache.accelerate(pipe, policy="fbcache", threshold=0.12)
    pipe = dcache.accelerate(pipe, policy="fbcache", fn_blocks=2, bn_blocks=1)   # dual-block
    pipe = dcache.accelerate(pipe, policy="fbcache", warmup_steps=8, warmup_interval=2,
                             steps_mask=[1] * 6 + [0, 1] * 22)                    # DBCache-style
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dcache.kernels import taylor
from dcache.kernels.rel_l1 import rel_l1, rel_l1_rows
from dcache.registry import register_policy
from dcache.schedulers._base import PolicyEnv, PolicyState, StepPolicy
from dcache.schedulers._common import require_blocks
from dcache.schedulers._validate import check_bool, check_choice, check_float, check_int


class FBCacheState(PolicyState):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.reference: torch.Tensor | None = None
        self.consecutive = 0
        self.cached = 0
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
        self.residual_order = config.residual_order
        self.difference_from = config.difference_from
        warmup = config.warmup_steps
        if config.steps_mask is not None:
            lead = next((i for i, m in enumerate(config.steps_mask) if m != 1), len(config.steps_mask))
            warmup = min(warmup, lead)
        self.warmup_end = warmup

    def new_state(self) -> FBCacheState:
        return FBCacheState()

    def gate(self, state: FBCacheState, step: Any) -> str:
        """cache-dit's checks before the distance, in its order: "compute", "cache" or "test"."""
        c = self.config
        s = step.index
        if s < self.warmup_end and s % c.warmup_interval == 0:
            return "compute"
        if c.steps_mask is not None and s < len(c.steps_mask):
            if c.steps_mask[s] == 1:
                return "compute"
            if c.steps_policy == "static":
                return "cache"
        elif c.steps_mask is not None and c.steps_policy == "static":
            return "cache"  # past the mask's end cache-dit's static policy caches too
        if c.max_cached_steps is not None and state.cached >= c.max_cached_steps:
            return "compute"
        if c.max_consecutive and state.consecutive >= c.max_consecutive:
            return "compute"
        return "test"

    @torch.compiler.disable
    def decide(self, state: FBCacheState, step: Any, signal: torch.Tensor | None) -> Any:
        if self.per_sample:
            return self._decide_rows(state, step, signal)
        c = self.config
        reuse = False
        gate = self.gate(state, step)
        if state.reference is not None and state.reference.shape == signal.shape and gate != "compute":
            if gate == "cache":
                reuse = True
            else:
                d = float(rel_l1(signal, state.reference, self.group))
                state.last_distance = d
                reuse = d < c.threshold
        if reuse:
            state.consecutive += 1
            state.cached += 1
            return False
        state.reference = signal.detach()
        state.consecutive = 0
        return True

    def _decide_rows(self, state: FBCacheState, step: Any, signal: torch.Tensor) -> Any:
        """One reference per batch row: a row's reference moves only when that row is computed.
        The step gates (warm-up, mask, caps) apply to every row alike; the caps count per row."""
        c = self.config
        ref = state.reference
        rows = signal.shape[0]
        if ref is None or ref.shape != signal.shape:
            state.reference = signal.detach().clone()
            state.consecutive = torch.zeros(rows, dtype=torch.long)
            state.cached = torch.zeros(rows, dtype=torch.long)
            return True
        s = step.index
        c_mask = c.steps_mask
        if s < self.warmup_end and s % c.warmup_interval == 0 or (c_mask is not None and s < len(c_mask) and c_mask[s] == 1):
            state.reference = signal.detach().clone()
            state.consecutive = torch.zeros(rows, dtype=torch.long)
            return True
        if c_mask is not None and c.steps_policy == "static":
            reuse = torch.ones(rows, dtype=torch.bool)
        else:
            d = rel_l1_rows(signal, ref, self.group).cpu()
            state.last_distance = d
            reuse = d < c.threshold
            if c.max_cached_steps is not None:
                reuse &= state.cached < c.max_cached_steps
            if c.max_consecutive:
                reuse &= state.consecutive < c.max_consecutive
        state.consecutive = torch.where(reuse, state.consecutive + 1, torch.zeros_like(state.consecutive))
        state.cached = state.cached + reuse.long()
        compute = ~reuse
        idx = compute.nonzero().flatten().to(signal.device)
        state.reference[idx] = signal.detach()[idx]
        return compute


@register_policy("fbcache", description="first-block residual test against the last full step; Fn/Bn dual-block variant", granularity="step")
@dataclass
class FBCacheConfig:
    """First-Block Cache.

    Args:
        threshold: relative-L1 change of the first blocks' residual below which the rest is reused
            (ParaAttention's FLUX default 0.08; diffusers uses 0.05). Default 0.12: on the
            embedded scenes model it computes 49% of the FLOPs at 37.0 dB PSNR, where 0.08 computes
            60% (45.1 dB) and 0.2 39% (34.9 dB) (bench/results/gates-fbcache-sweep, 4 samples).
        fn_blocks: leading blocks always computed; their residual is the change signal (≥ 1).
        bn_blocks: trailing blocks always computed after the reused span (≥ 0).
        warmup_steps: leading steps always computed (cache-dit's ``max_warmup_steps``; it uses 8
            by default, and the DBCache peer of ``dcache bench --peers`` uses 3).
        warmup_interval: within the warm-up only every ``warmup_interval``-th step is forced
            (cache-dit's ``warmup_interval``; its "F" and "U" recipes use 2 and 4); the others
            take the threshold test.
        max_consecutive: cap on consecutive reused steps (0 = no cap).
        max_cached_steps: cap on reused steps per generation and branch (None = no cap).
        steps_mask: per-step list of 1 (always compute) and 0 (may cache), cache-dit's
            ``steps_computation_mask`` (``cache_dit.steps_mask(...)`` makes one). Steps past its
            end follow ``steps_policy`` like its 0s.
        steps_policy: "dynamic" (the threshold still decides on 0-steps) or "static" (0-steps
            are cached whatever the distance).
        per_sample: one reference and decision per batch row: changed rows are computed, the
            others reuse (default: one decision for the whole batch).
        residual_order: 0 reuses the middle blocks' last computed residual on a skipped step
            (FBCache, DBCache); k > 0 adds its order-k Taylor forecast over the step index from
            the computed steps instead, as cache-dit's DBCache + TaylorSeer calibrator
            (``taylorseer_order``; hidden and encoder residuals, per guidance branch). Not with
            ``per_sample`` or a module forecaster.
        difference_from: with ``residual_order`` > 0, computed steps before this index refresh
            the residual but form no difference (default 3, where cache-dit's calibrator forms
            its first; 0 differences from the second computed step on).
    """

    threshold: float = 0.12
    fn_blocks: int = 1
    bn_blocks: int = 0
    warmup_steps: int = 1
    warmup_interval: int = 1
    max_consecutive: int = 0
    max_cached_steps: int | None = None
    steps_mask: Any = None
    steps_policy: str = "dynamic"
    per_sample: bool = False
    residual_order: int = 0
    difference_from: int = 3

    def __post_init__(self) -> None:
        check_float("fbcache", "threshold", self.threshold, 0.0)
        check_int("fbcache", "fn_blocks", self.fn_blocks, 1)
        check_int("fbcache", "bn_blocks", self.bn_blocks, 0)
        check_int("fbcache", "warmup_steps", self.warmup_steps, 0)
        check_int("fbcache", "warmup_interval", self.warmup_interval, 1)
        check_int("fbcache", "max_consecutive", self.max_consecutive, 0)
        if self.max_cached_steps is not None:
            check_int("fbcache", "max_cached_steps", self.max_cached_steps, 0)
        check_choice("fbcache", "steps_policy", self.steps_policy, ("dynamic", "static"))
        if self.steps_mask is not None:
            mask = self.steps_mask
            if (not isinstance(mask, (list, tuple)) or not mask
                    or not all(isinstance(m, int) and not isinstance(m, bool) and m in (0, 1) for m in mask)):
                raise ValueError(f"fbcache: steps_mask must be a non-empty list of 0 and 1 (1 = compute), got {mask!r}")
            self.steps_mask = list(mask)
        check_bool("fbcache", "per_sample", self.per_sample)
        check_int("fbcache", "residual_order", self.residual_order, 0, taylor.MAX_TERMS - 1)
        check_int("fbcache", "difference_from", self.difference_from, 0)
        if self.residual_order and self.per_sample:
            raise ValueError("fbcache: residual_order forecasts one residual per branch; it cannot be combined with per_sample=True")

    def build(self, env: PolicyEnv) -> FBCachePolicy:
        require_blocks(env.has_blocks, env.family, "fbcache needs a transformer block chain")
        if self.fn_blocks + self.bn_blocks >= env.num_blocks:
            raise ValueError(
                f"fbcache: fn_blocks + bn_blocks must be less than the model's {env.num_blocks} blocks, "
                f"got {self.fn_blocks} + {self.bn_blocks}"
            )
        return FBCachePolicy(self)
