"""Base of token-subset policies: on a partial step only some tokens go through a cached module.

Installed by ``dcache.installers.token_subset``. A policy answers three questions; the installer
owns the tensors (cached outputs and inputs, per-token staleness), the gather and the scatter.

- ``action(state, step)``: once per (step, branch). ``Action.COMPUTE`` runs every site on all
  tokens and refreshes the caches; ``Action.REUSE`` is a partial step.
- ``fraction(kind, step)``: on a partial step, the share of a site's tokens recomputed, per site
  kind (``"self"`` attention, ``"cross"`` attention, ``"mlp"``). Self-attention sites are only
  recomputed in full or reused in full (see the installer for why).
- ``score(x, x_ref, stale, step)``: (B, N) scores from the site's current input ``x``, its input
  at the time each token was last computed ``x_ref`` and the steps since then ``stale``; the
  top-scoring tokens are recomputed. No attention map is needed, so fused SDPA kernels work.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.schedulers._common import Action, Policy, PolicyState

SITE_KINDS = ("self", "cross", "mlp")


class TokenPolicy(Policy):
    """Decides per step whether token sites are computed in full or on a chosen subset of tokens."""

    granularity = "token"

    def new_state(self) -> PolicyState:
        raise NotImplementedError

    def action(self, state: Any, step: Any) -> Action:
        raise NotImplementedError

    def fraction(self, kind: str, step: Any) -> float:
        raise NotImplementedError

    def score(self, x: torch.Tensor, x_ref: torch.Tensor, stale: torch.Tensor, step: Any) -> torch.Tensor:
        raise NotImplementedError


def num_tokens(fraction: float, n: int) -> int:
    """Tokens recomputed out of ``n`` at ``fraction``: rounded, so 1.0 is all and 0.0 is none."""
    return max(0, min(n, int(round(fraction * n))))
