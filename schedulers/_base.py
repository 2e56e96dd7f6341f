"""The policy base classes, one file per granularity, re-exported here.

The engine (``dcache.installers``) owns hooks, tensors and accounting; a policy only decides.
Per-branch state comes from ``new_state()`` and lives in the Run, so it is fresh at the start of
every generation and separate for the cond and uncond passes.

==============  ==========================  ====================================
granularity     base class (file)           installer (``dcache/installers/``)
==============  ==========================  ====================================
step            StepPolicy (_step.py)       block_chain.py, whole_model.py (UNets)
module          ModulePolicy (_module.py)   module_sites.py
block           BlockPolicy (_block.py)     block_range.py
guidance        GuidancePolicy (_guidance)  guidance.py
token           TokenPolicy (_token.py)     token_subset.py
unet_branch     BranchPolicy (_branch.py)   unet_branch.py (DeepCache)
==============  ==========================  ====================================
"""

from __future__ import annotations

from dcache.schedulers._block import BlockPolicy
from dcache.schedulers._branch import BranchPolicy
from dcache.schedulers._common import Action, Policy, PolicyEnv, PolicyState
from dcache.schedulers._guidance import GuidancePolicy
from dcache.schedulers._module import ModulePolicy
from dcache.schedulers._step import StepPolicy
from dcache.schedulers._token import TokenPolicy

__all__ = ["Action", "Policy", "PolicyEnv", "PolicyState", "StepPolicy", "ModulePolicy", "BlockPolicy",
           "GuidancePolicy", "TokenPolicy", "BranchPolicy"]
