"""Base of step-level policies: compute the block chain (or the whole model), or reuse its residual.

Installed by ``dcache.installers.block_chain`` on models with a block chain and by
``dcache.installers.whole_model`` on models without one (UNets).
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.schedulers._common import Policy, PolicyState


class StepPolicy(Policy):
    """Decides per step whether the block chain (or whole model) is computed or its residual reused.

    ``head_blocks`` run before the decision (FBCache's first block), ``tail_blocks`` always run
    after the cached span. ``needs_probe`` asks the engine for the adapter's TeaCache probe;
    ``needs_input`` for the span's input hidden states instead (EasyCache's input change).
    ``per_sample`` (set by configs that offer it) asks for one decision per batch row: ``decide``
    then receives a signal per row and returns a bool tensor of rows to compute.
    ``residual_order`` (set by configs that offer it) forecasts the skipped span's residual.
    """

    granularity = "step"
    head_blocks = 0
    tail_blocks = 0
    needs_probe = False
    needs_input = False
    per_sample = False
    # > 0: skipped steps add a Taylor forecast of the span residual of this order instead of the
    # last computed residual (dcache.installers._residual).
    residual_order = 0
    difference_from = 0  # computed steps before it refresh the forecast's value, not its differences

    def new_state(self) -> PolicyState:
        raise NotImplementedError

    def decide(self, state: Any, step: Any, signal: torch.Tensor | None) -> bool:
        """Return True to compute the span this step, False to reuse the cached residual."""
        raise NotImplementedError

    def after_compute(self, state: Any, step: Any, span_input: torch.Tensor, span_output: torch.Tensor) -> None:
        """Called after a computed span with its (image-stream) input and output."""
