"""Base of block-level policies: each transformer block is computed or its own residual reused.

Installed by ``dcache.installers.block_range``. Δ-DiT (skip a range of blocks at some steps) and
similarity-triggered block caching are policies of this shape.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.schedulers._common import Policy, PolicyState


class BlockPolicy(Policy):
    """Per step and block: compute block ``index`` or return its input plus its cached residual.

    ``blocks(num_blocks)`` names the block indices the policy may skip (the installer hooks only
    those). ``decide`` sees the block's image-stream input, so a similarity trigger can use it.
    """

    granularity = "block"

    def new_state(self) -> PolicyState:
        raise NotImplementedError

    def blocks(self, num_blocks: int) -> list[int]:
        return list(range(num_blocks))

    def decide(self, state: Any, step: Any, index: int, hidden: torch.Tensor) -> bool:
        """True: run block ``index`` this step; False: reuse its residual from the last computed step."""
        raise NotImplementedError

    def after_compute(self, state: Any, step: Any, index: int, block_input: torch.Tensor,
                      block_output: torch.Tensor) -> None:
        """Called after block ``index`` ran, with its image-stream input and output."""
