"""Base of UNet skip-branch policies (DeepCache): per step, run the whole UNet or only its shallow path.

Installed by ``dcache.installers.unet_branch``. On a full step every module runs and the feature
entering the up block at skip branch ``branch`` is stored; otherwise only the modules above that
branch run, with the stored feature in place of everything beneath it.
"""

from __future__ import annotations

from typing import Any

from dcache.schedulers._common import Policy, PolicyState


class BranchPolicy(Policy):
    """Decides per step (and guidance branch) whether the deep part of a UNet is computed.

    ``branch`` is the skip-branch id (0 = shallowest: only the first down block and the last up
    block run on cached steps); the installer checks it against the model.
    """

    granularity = "unet_branch"
    branch = 0

    def new_state(self) -> PolicyState:
        raise NotImplementedError

    def decide(self, state: Any, step: Any) -> bool:
        """True: a full step (compute everything, refresh the deep feature); False: shallow path only."""
        raise NotImplementedError
