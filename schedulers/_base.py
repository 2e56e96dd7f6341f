"""The two shapes a policy takes: a step-level decider and a module-level forecaster.

The engine (``dcache.step_cache`` / ``dcache.module_cache``) owns hooks, tensors and accounting;
a policy only decides. Per-branch state comes from ``new_state()`` and lives in the Run, so it is
fresh at the start of every generation and separate for the cond and uncond passes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch


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


class PolicyState:
    def reset(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class StepPolicy:
    """Decides per step whether the block chain (or whole model) is computed or its residual reused.

    ``head_blocks`` run before the decision (FBCache's first block), ``tail_blocks`` always run
    after the cached span. ``needs_probe`` asks the engine for the adapter's TeaCache probe.
    """

    granularity = "step"
    group: Any = None  # set from PolicyEnv.parallel_group by the engine
    head_blocks = 0
    tail_blocks = 0
    needs_probe = False

    def new_state(self) -> PolicyState:
        raise NotImplementedError

    def decide(self, state: Any, step: Any, signal: torch.Tensor | None) -> bool:
        """Return True to compute the span this step, False to reuse the cached residual."""
        raise NotImplementedError

    def after_compute(self, state: Any, step: Any, span_input: torch.Tensor, span_output: torch.Tensor) -> None:
        """Called after a computed span with its (image-stream) input and output."""

    def on_run_end(self) -> None:
        """Called when a generation ends (calibration hooks)."""


class ModulePolicy:
    """Decides per step whether module sites are computed or forecast from their history."""

    granularity = "module"

    def new_state(self) -> PolicyState:
        raise NotImplementedError

    def action(self, state: Any, step: Any) -> Action:
        raise NotImplementedError

    def new_site_state(self) -> Any:
        raise NotImplementedError

    def store(self, site_state: Any, value: torch.Tensor, step: Any) -> None:
        raise NotImplementedError

    def produce(self, site_state: Any, step: Any) -> torch.Tensor:
        raise NotImplementedError

    def on_run_end(self) -> None:
        pass
