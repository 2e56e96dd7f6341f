"""`easycache`: runtime-adaptive step cache from the transformation rate (H-EmbodVis/EasyCache, arXiv 2507.02860).

No calibration. After every computed step the *transformation rate* of the block chain,
``k = mean|out_t - out_c| / mean|in_t - in_c|`` (``c`` = the previous computed step), says how
strongly a change of its input shows in its output. On the following steps the input change since
the previous step predicts the output change relative to the last output,
``eps += k * mean|x_t - x_(t-1)| / mean|out_c|``; while the accumulated ``eps`` stays below
``threshold`` the chain is skipped and its last transformation ``out_c - in_c`` added to the
current input, otherwise it is computed and ``eps`` reset (shared/reference/caching-algorithms.md,
"EasyCache"). The first ``warmup_steps`` steps and the last step are always computed. The
decision is taken on the first guidance branch (cond) and shared by the others, each of which
keeps its own cached transformation.

Here "input" and "output" are the token stream entering the first block and leaving the last
one (the latent after the patch embedding), where dcache's block chain caches residuals.

Example::

    pipe = dcache.accelerate(pipe, policy="easycache")                    # Wan defaults: R=10, tau=0.05
    pipe = dcache.accelerate(pipe, policy="easycache", threshold=0.1)     # "0.1 -> ~2x" on Wan2.1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dcache.registry import register_policy
from dcache.schedulers._base import PolicyEnv, PolicyState, StepPolicy
from dcache.schedulers._common import require_blocks
from dcache.schedulers._validate import check_bool, check_float, check_int

_EPS = 1e-12


def _mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


class EasyCacheState(PolicyState):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.previous_input: torch.Tensor | None = None  # x_(t-1), every step
        self.computed_input: torch.Tensor | None = None  # in_c
        self.computed_output: torch.Tensor | None = None  # out_c
        self.rate: float | None = None  # k
        self.error = 0.0
        self.last_rate_input: float | None = None

    def cache_nbytes(self) -> int:
        ts = (self.previous_input, self.computed_input, self.computed_output)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


class EasyCachePolicy(StepPolicy):
    needs_input = True

    def __init__(self, config: "EasyCacheConfig") -> None:
        self.config = config
        # (step index, decision) of the first branch, shared with the other branches of that step.
        self._shared: tuple[int, bool] | None = None

    def new_state(self) -> EasyCacheState:
        return EasyCacheState()

    @torch.compiler.disable
    def decide(self, state: EasyCacheState, step: Any, signal: torch.Tensor | None) -> bool:
        c = self.config
        if step.branch > 0 and c.share_decision:
            shared = self._shared
            return True if shared is None or shared[0] != step.index else shared[1]
        x = signal.detach()
        prev, state.previous_input = state.previous_input, x
        compute = True
        if not (step.index < c.warmup_steps or (c.compute_last and step.is_last) or state.rate is None
                or prev is None or prev.shape != x.shape or state.computed_output.shape != x.shape):
            out_scale = float(state.computed_output.float().abs().mean())
            state.error += state.rate * _mean_abs_diff(x, prev) / max(out_scale, _EPS)
            compute = state.error >= c.threshold
        if compute:
            state.error = 0.0
        self._shared = (step.index, compute)
        return compute

    def after_compute(self, state: EasyCacheState, step: Any, span_input: torch.Tensor, span_output: torch.Tensor) -> None:
        if step.branch > 0 and self.config.share_decision:
            return
        x, y = span_input.detach(), span_output.detach()
        if state.computed_input is not None and state.computed_input.shape == x.shape:
            state.rate = _mean_abs_diff(y, state.computed_output) / max(_mean_abs_diff(x, state.computed_input), _EPS)
        state.computed_input, state.computed_output = x, y


@register_policy("easycache", description="runtime transformation-rate step cache, no calibration", granularity="step")
@dataclass
class EasyCacheConfig:
    """EasyCache.

    Args:
        threshold: accumulated predicted change (tau) below which the chain is skipped (official
            Wan2.1 default 0.05, "0.1 -> ~2x, 0.2 -> ~3x"; HunyuanVideo 0.025).
        warmup_steps: leading steps always computed (R: Wan2.1 10 of 50, HunyuanVideo 5).
        compute_last: always compute the final step (as the reference does).
        share_decision: the first guidance branch decides for the step and the others follow (the
            reference); False gives every branch its own test.
    """

    threshold: float = 0.05
    warmup_steps: int = 10
    compute_last: bool = True
    share_decision: bool = True

    def __post_init__(self) -> None:
        check_float("easycache", "threshold", self.threshold, 0.0)
        check_int("easycache", "warmup_steps", self.warmup_steps, 0)
        check_bool("easycache", "compute_last", self.compute_last)
        check_bool("easycache", "share_decision", self.share_decision)

    def build(self, env: PolicyEnv) -> EasyCachePolicy:
        require_blocks(env.has_blocks, env.family, "easycache caches the transformation of a transformer block chain")
        return EasyCachePolicy(self)
