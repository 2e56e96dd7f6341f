"""One installer per granularity. Each hooks what its policies act on and returns the number of
sites it hooked; ``dcache.engine.install`` adds the counts up and refuses 0.

An installer is ``fn(target, policy) -> int`` registered under the policy base's ``granularity``
with :func:`register_installer`. Built in:

================  ===================  ==========================================================
granularity       file                 hooks
================  ===================  ==========================================================
step              block_chain.py       every block of the chain (reuse the span's residual)
step              whole_model.py       the denoiser call (models without a block chain: UNets)
module            module_sites.py      attention/MLP sites inside each block (forecasters)
block             block_range.py       the blocks a policy names (reuse each block's residual)
guidance          guidance.py          the denoiser call of guidance branches ≥ 1 (CFG)
token             token_subset.py      attention/MLP token sites (recompute chosen tokens, ToCa)
unet_branch       unet_branch.py       the modules beneath a UNet skip branch + its up block (DeepCache)
attention-output  attention.py         attention modules by kind: spatial / temporal / cross (PAB)
cfg-cache         cfg_cache.py         the denoiser call, both CFG layouts, + attention (FasterCache)
================  ===================  ==========================================================

How to add one: ``docs/engine.md``.
"""

from __future__ import annotations

from typing import Any, Callable

from dcache.installers import attention, block_chain, block_range, cfg_cache, guidance, module_sites, token_subset, unet_branch, whole_model

Installer = Callable[[Any, Any], int]
_INSTALLERS: dict[str, Installer] = {}


def register_installer(granularity: str, fn: Installer) -> None:
    """Make ``dcache.accelerate`` install policies whose base declares ``granularity``."""
    _INSTALLERS[granularity] = fn


def granularities() -> list[str]:
    return sorted(_INSTALLERS)


def installer_for(granularity: str) -> Installer | None:
    return _INSTALLERS.get(granularity)


def _step(target: Any, policy: Any) -> int:
    # A block chain when the adapter has one (unless the policy asks for the whole call), the
    # whole denoiser call otherwise.
    if target.adapter.has_blocks and getattr(policy, "level", "residual") != "output":
        return block_chain.install(target, policy)
    return whole_model.install(target, policy)


register_installer("step", _step)
register_installer("module", module_sites.install)
register_installer("block", block_range.install)
register_installer("guidance", guidance.install)
register_installer("token", token_subset.install)
register_installer("unet_branch", unet_branch.install)
register_installer("attention-output", attention.install)
register_installer("cfg-cache", cfg_cache.install)
