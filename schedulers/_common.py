"""What every policy base shares: the action enum, the environment the engine passes, state."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Action(str, enum.Enum):
    COMPUTE = "compute"
    REUSE = "reuse"
    FORECAST = "forecast"


@dataclass
class PolicyEnv:
    """What the engine tells a policy about the model it is installed on (never the model itself)."""

    family: str
    num_blocks: int
    has_blocks: bool
    teacache_coefficients: list[float] | None = None
    coefficients_source: str = ""
    model_id: str = ""
    # Process group of a context-parallel denoiser: data-dependent decisions reduce over it.
    parallel_group: Any = None
    # Warm-up steps the coefficient source pairs with its coefficients (TeaCache's Wan ret-steps: 5).
    teacache_warmup_steps: int | None = None
    # Attention kinds the blocks have (BlockSpec.attention): "spatial", "temporal", "cross".
    attention_kinds: tuple[str, ...] = ()
    # Why the model has no true CFG (guidance-distilled), or None.
    guidance_distilled: str | None = None
    # The denoiser's class and a hash of its config: identity for files measured on one model.
    model_class: str = ""
    config_hash: str = ""


# What a model without a transformer block chain (a UNet) can run: named in every refusal.
BLOCKLESS_POLICIES = "none, static, teacache (whole-model steps), deepcache"


def require_blocks(has_blocks: bool, family: str, what: str) -> None:
    """Refuse a policy that needs transformer blocks on a model without them, naming what it can run.

    ``what`` says what the policy does there, e.g. "foca forecasts module outputs inside
    transformer blocks"; the error reads "<what>; <family> models support only: ...".
    """
    if not has_blocks:
        raise ValueError(f"{what}; {family} models support only: {BLOCKLESS_POLICIES}")


class PolicyState:
    def reset(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class Policy:
    """Root of every policy base. ``granularity`` names the installer that hooks it."""

    granularity = ""
    group: Any = None  # set from PolicyEnv.parallel_group by the engine

    def on_run_end(self) -> None:
        """Called when a generation ends (calibration hooks)."""
