"""`toca`: token-wise caching (ToCa, arXiv 2410.05317, ICLR 2025; code Shenyi-Z/ToCa).

Every ``interval`` steps (after ``warmup_steps`` full steps) is a full step: every token of every
token site is computed and cached. On the steps in between each MLP / cross-attention site
recomputes only its top ``mlp_ratio`` / ``cross_ratio`` share of tokens and reuses the cached
output of the others; self-attention is reused in full (``self_ratio`` 0, ToCa's own attention
module factor, shared/reference/caching-algorithms.md §4.1) or recomputed in full (1).

The token score needs no attention map, so fused SDPA / FlashAttention kernels keep working
(DuCa, arXiv 2412.18911, shows map-free selection is as good):

    score = s / ||s||₂ + stale_weight · (steps since the token was computed) / interval

with ``s`` per token: ``"change"`` (default), the relative L2 change of the site's input token
since it was last computed, ``‖x − x_ref‖ / ‖x_ref‖``; ``"norm"``, the input token's L2 norm
(ToCa's ``norm`` option); ``"random"`` (DuCa's choice; seeded by step and branch, so runs
repeat). The staleness term is ToCa's cache-frequency score s3 with its ``soft_fresh_weight``.
``step_weight`` is ToCa's step factor: fractions are scaled by ``1 + w − 2w·step/num_steps``
(more tokens early when w > 0); 0 keeps them constant.

Left out of ToCa: the attention-map scores s1/s2 (they need the attention matrix), the 2×2
spatial-uniformity bonus s4, the layer factor, and the forced full steps in the 20–40% range.

Example::

    pipe = dcache.accelerate(pipe, policy="toca", interval=5, mlp_ratio=0.1, warmup_steps=3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dcache.registry import register_policy
from dcache.schedulers._base import Action, PolicyEnv, PolicyState
from dcache.schedulers._common import require_blocks
from dcache.schedulers._token import TokenPolicy
from dcache.schedulers._validate import check_bool, check_choice, check_float, check_int

SCORES = ("change", "norm", "random")
_EPS = 1e-12


class TocaState(PolicyState):
    """Per-branch schedule state."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.last_full: int | None = None


class TocaPolicy(TokenPolicy):
    def __init__(self, config: "TocaConfig") -> None:
        self.config = config

    def new_state(self) -> TocaState:
        return TocaState()

    @torch.compiler.disable
    def action(self, state: TocaState, step: Any) -> Action:
        c = self.config
        s = step.index
        if (state.last_full is None or s < c.warmup_steps or (c.compute_last and step.is_last)
                or s - state.last_full >= c.interval):
            state.last_full = s
            return Action.COMPUTE
        return Action.REUSE

    def fraction(self, kind: str, step: Any) -> float:
        c = self.config
        base = {"self": c.self_ratio, "cross": c.cross_ratio, "mlp": c.mlp_ratio}[kind]
        if kind == "self" or not c.step_weight or not step.num_steps:
            return base
        w = c.step_weight
        return min(1.0, max(0.0, base * (1 + w - 2 * w * step.index / step.num_steps)))

    @torch.compiler.disable
    def score(self, x: torch.Tensor, x_ref: torch.Tensor, stale: torch.Tensor, step: Any) -> torch.Tensor:
        c = self.config
        if c.score == "change":
            xf, rf = x.float(), x_ref.float()
            s = (xf - rf).norm(dim=-1) / rf.norm(dim=-1).clamp_min(_EPS)
        elif c.score == "norm":
            s = x.float().norm(dim=-1)
        else:
            g = torch.Generator(device=x.device).manual_seed(step.index * 7919 + step.branch)
            s = torch.rand(x.shape[:2], generator=g, device=x.device)
        s = s / s.norm(dim=1, keepdim=True).clamp_min(_EPS)
        return s + c.stale_weight * stale / c.interval


@register_policy("toca", description="token-wise caching: recompute the top-scoring share of tokens through MLP/cross-attention between full steps",
                 granularity="token")
@dataclass
class TocaConfig:
    """ToCa.

    Args:
        interval: a full step every ``interval`` steps (ToCa's ``fresh_threshold``; FLUX 5, DiT
            DDIM-50 3).
        warmup_steps: leading steps always full (ToCa FLUX ``first_enhance`` 3).
        mlp_ratio: share of tokens an MLP site recomputes on a partial step (ToCa FLUX
            ``fresh_ratio`` 0.1).
        cross_ratio: the same for cross-attention sites (queries subset; text K/V in full).
        self_ratio: self-attention on a partial step: 0 reuses it in full (ToCa's attention
            module factor), 1 recomputes it in full; no value in between is supported.
        score: ``"change"``, ``"norm"`` or ``"random"`` (module docstring).
        stale_weight: weight of the steps-since-computed term (ToCa ``soft_fresh_weight`` 0.25).
        step_weight: ToCa's step factor weight w (0: constant fractions; ToCa DDIM-50 uses 2.0).
        compute_last: also make the final step full (as in ``taylorseer``; not in ToCa's code).
    """

    interval: int = 5
    warmup_steps: int = 3
    mlp_ratio: float = 0.1
    cross_ratio: float = 0.1
    self_ratio: float = 0.0
    score: str = "change"
    stale_weight: float = 0.25
    step_weight: float = 0.0
    compute_last: bool = True

    def __post_init__(self) -> None:
        check_int("toca", "interval", self.interval, 1)
        check_int("toca", "warmup_steps", self.warmup_steps, 0)
        check_float("toca", "mlp_ratio", self.mlp_ratio, 0.0, 1.0)
        check_float("toca", "cross_ratio", self.cross_ratio, 0.0, 1.0)
        check_float("toca", "self_ratio", self.self_ratio, 0.0, 1.0)
        if self.self_ratio not in (0, 1):
            raise ValueError(
                f"toca: self_ratio must be 0 (reuse self-attention in full on partial steps) or 1 "
                f"(recompute it in full), got {self.self_ratio!r}; a query subset of self-attention is not built")
        check_choice("toca", "score", self.score, SCORES)
        check_float("toca", "stale_weight", self.stale_weight, 0.0)
        check_float("toca", "step_weight", self.step_weight, -1.0, 1e6)
        check_bool("toca", "compute_last", self.compute_last)

    def build(self, env: PolicyEnv) -> TocaPolicy:
        require_blocks(env.has_blocks, env.family, "toca recomputes tokens through attention/MLP inside transformer blocks")
        return TocaPolicy(self)
