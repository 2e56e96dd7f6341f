"""Base of guidance-level (CFG) policies: a guidance branch is computed or derived from the others.

Installed by ``dcache.installers.guidance`` on the denoiser call. It acts on pipelines that run
the guidance branches as separate denoiser calls (sequential CFG: Wan, Flux true-CFG, QwenImage,
HunyuanVideo, LTX); a batched-CFG call is one branch and is always computed.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.schedulers._common import Policy, PolicyState


class GuidancePolicy(Policy):
    """Per step and branch ≥ 1: compute the denoiser call or produce its prediction from history.

    Branch 0 (the first call of a step, the conditional pass) is always computed. ``store`` sees
    every computed prediction; ``produce`` gets the predictions already made this step.
    """

    granularity = "guidance"

    def new_state(self) -> PolicyState:
        raise NotImplementedError

    def decide(self, state: Any, step: Any, branch: int) -> bool:
        """True: compute branch ``branch`` this step; False: ``produce`` it."""
        raise NotImplementedError

    def store(self, state: Any, step: Any, branch: int, prediction: torch.Tensor) -> None:
        raise NotImplementedError

    def produce(self, state: Any, step: Any, branch: int, this_step: dict[int, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError
