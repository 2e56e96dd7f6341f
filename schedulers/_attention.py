"""Base of attention-level policies: each attention module's output is computed or produced.

Installed by ``dcache.installers.attention`` on the attention modules the adapter names
(``BlockSpec.attention``: spatial, temporal or cross). Pyramid Attention Broadcast and
FasterCache's attention reuse are policies of this shape.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.schedulers._common import Policy, PolicyState

KINDS = ("spatial", "temporal", "cross")


class AttentionHistory:
    """The last ``depth`` computed outputs of one attention module in one branch (newest first),
    as lists of tensor leaves, with the steps they were computed at."""

    __slots__ = ("values", "steps", "depth")

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.values: list[list[torch.Tensor | None]] = []
        self.steps: list[int] = []

    def push(self, leaves: list[torch.Tensor | None], step: int) -> None:
        if self.steps and self.steps[0] == step:
            # A second-order scheduler's corrector at the same step: keep one entry per step.
            self.values[0] = leaves
            return
        self.values.insert(0, leaves)
        self.steps.insert(0, step)
        del self.values[self.depth:], self.steps[self.depth:]

    def cache_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self.values for t in v if t is not None)


class AttentionPolicy(Policy):
    """Per step, branch and attention kind: compute the attention modules or produce their output.

    ``ranges`` maps each kind the policy acts on to its broadcast/skip range (resolved against the
    model by ``build``); the installer hooks only modules of those kinds. ``history_depth`` says how
    many computed outputs ``produce`` needs.
    """

    granularity = "attention-output"
    history_depth = 1
    ranges: dict[str, int] = {}

    def new_state(self) -> PolicyState:
        raise NotImplementedError

    def reuse(self, state: Any, step: Any, kind: str) -> bool:
        """True: produce this kind's outputs this step (if the history allows); False: compute."""
        raise NotImplementedError

    def computed(self, state: Any, step: Any, kind: str) -> None:
        """Called once per step and kind when its modules are computed."""

    def produce(self, history: AttentionHistory, step: Any, kind: str) -> list[torch.Tensor | None] | None:
        """Leaves of the output to return instead of computing; None: compute after all."""
        raise NotImplementedError
