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


class PolicyState:
    def reset(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class Policy:
    """Root of every policy base. ``granularity`` names the installer that hooks it."""

    granularity = ""
    group: Any = None  # set from PolicyEnv.parallel_group by the engine

    def on_run_end(self) -> None:
        """Called when a generation ends (calibration hooks)."""
