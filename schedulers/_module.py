"""Base of module-level policies: forecast attention/MLP sites from their history.

Installed by ``dcache.installers.module_sites``.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.schedulers._common import Action, Policy, PolicyState


class ModulePolicy(Policy):
    """Decides per step whether module sites are computed or forecast from their history."""

    granularity = "module"
    # True: ``new_site_state(name)`` receives the site's name (``<module name>[<output leaf>]``).
    named_sites = False

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
