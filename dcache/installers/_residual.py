"""Forecast of a cached span residual on skipped steps (a step gate's own forecaster).

A step policy with ``residual_order`` k > 0 keeps, per branch and stream, the residual of its
computed steps as Taylor terms (value, then divided differences over the distance in steps to
the previous computed step, up to order k: ``kernels.taylor``), and a skipped step gets
Σ Fᵢ·dⁱ/i! with d the steps since the last computation instead of the last residual. This is
what cache-dit's DBCache + TaylorSeer calibrator does with the Bn residual (its
``TaylorSeerState``: differences over the logical step counter, per CFG branch, hidden and
encoder streams; shared/reference/cache-dit.md §1). Order 0 is plain reuse.

Computed steps before ``difference_from`` refresh the value but form no difference. cache-dit's
calibrator forms its first difference at step 3 (its state is created by the first update, so its
counter runs one step behind the loop, and it differences only once the counter passes 1); a
difference taken inside the warm-up, where the residual changes fastest, and extrapolated over
the next skipped steps costs 11 dB on the embedded model (docs/policies/fbcache.md).
"""

from __future__ import annotations

import torch

from dcache.kernels import taylor


class ResidualHistory:
    """Taylor terms of one residual stream over the computed steps of one branch."""

    __slots__ = ("order", "difference_from", "terms", "n_valid", "last_step")

    def __init__(self, order: int, difference_from: int = 0) -> None:
        self.order = order
        self.difference_from = difference_from
        self.reset()

    def reset(self) -> None:
        """Forget every stored residual (the next store starts a new history)."""
        self.terms: torch.Tensor | None = None
        self.n_valid = 0
        self.last_step = 0

    def store(self, value: torch.Tensor, step_index: int) -> None:
        if self.terms is None or self.terms.shape[1:] != value.shape or self.terms.dtype != value.dtype:
            self.terms = torch.empty((self.order + 1, *value.shape), dtype=value.dtype, device=value.device)
            self.n_valid = 0
        elif step_index == self.last_step:
            # A second computed call at the same step (a second-order scheduler's corrector): the
            # differences are over steps, so the history keeps the step's first value.
            return
        elif step_index < self.difference_from:
            self.n_valid = 0  # value only: the next update starts the differences from here
        distance = float(max(step_index - self.last_step, 1))
        self.n_valid = taylor.update(self.terms, self.n_valid, value.detach(), distance)
        self.last_step = step_index

    def produce(self, step_index: int) -> torch.Tensor:
        return taylor.forecast(self.terms, self.n_valid, float(step_index - self.last_step))

    def cache_nbytes(self) -> int:
        return 0 if self.terms is None else self.terms.numel() * self.terms.element_size()
