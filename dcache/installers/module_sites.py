"""Module-level caching (granularity ``module``): attention/MLP sites are computed or forecast.

A site's output is taken where the block receives it, before the block multiplies it by the
gates it computed this step, so a forecast always meets fresh modulation. Feeders (modules whose
output only flows into a site, like Flux single blocks' ``attn``, ``proj_mlp`` and ``act_mlp``
into ``proj_out``) are skipped with their site: they return an empty placeholder (the recorded
shape with a last dimension of 0) instead of running.

Under a step gate (a ``step`` policy on the same denoiser's block chain, ``block_chain._Chain``),
the gate's decision for the step replaces the policy's own schedule: sites of the gated span
forecast on the steps the gate skips and compute (feeding their history) on the others; sites of
the gate's head and tail blocks always compute.

Guard: a site forecasts only when its call has the leading input dimensions (batch, tokens) it
had when its history was last stored; otherwise it computes and its history starts again.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.installers._common import cached_entry, input_signature, output_leaves, rebuild_output, step_action
from dcache.schedulers._common import Action
from dcache.wrapper import CALL


class SiteEntry:
    """Per (site, branch): the output's structure, one history per tensor leaf, the input signature."""

    __slots__ = ("structure", "states", "shapes", "signature")

    def __init__(self) -> None:
        self.structure: Any = None
        self.states: list[Any] = []
        self.shapes: list[tuple | None] = []
        self.signature: tuple | None = None

    def cache_nbytes(self) -> int:
        return sum(s.cache_nbytes() for s in self.states if hasattr(s, "cache_nbytes"))


class _Site:
    def __init__(self, target: Any, policy: Any, name: str, is_site: bool, block_index: int = -1) -> None:
        self.target, self.policy, self.name, self.is_site = target, policy, name, is_site
        self.block_index = block_index
        self.pid = id(policy)

    def _new_state(self, leaf: int) -> Any:
        # A policy with per-site parameters (HyCa's solver per channel) gets the leaf's name.
        if getattr(self.policy, "named_sites", False):
            return self.policy.new_site_state(f"{self.name}[{leaf}]")
        return self.policy.new_site_state()

    def _action(self, run: Any, step: Any) -> Action:
        chain = getattr(self.target, "step_chain", None)
        if chain is not None:
            # The step gate decides (see the module docstring); no decision yet (head blocks, or a
            # call that skipped the gate's block) means compute.
            if not chain.first <= self.block_index <= chain.last:
                return Action.COMPUTE
            gate = step.decisions.get((chain.pid, "decision"))
            skipped = gate is not None and not isinstance(gate, torch.Tensor) and not gate
            return Action.FORECAST if skipped else Action.COMPUTE
        return step_action(run, step, self.pid, self.policy)

    def pre(self, args: tuple, kwargs: dict) -> Any:
        found = cached_entry(self, args, kwargs)
        if found is None:
            return CALL
        run, step, entry = found
        run.avoid(self.name)
        if self.is_site:
            run.count("forecast", self.name)
            leaves = [None if s is None else self.policy.produce(s, step) for s in entry.states]
        else:
            # Feeders only flow into their site, which ignores its input on a forecast step: an
            # empty last dimension keeps every shape check and concatenation valid.
            leaves = [None if sh is None else torch.empty((*sh[0][:-1], 0), dtype=sh[1], device=sh[2])
                      for sh in entry.shapes]
        return rebuild_output(entry.structure, leaves)

    def post(self, args: tuple, kwargs: dict, out: Any) -> Any:
        run, step = self.target.active()
        if step is None:
            return out
        key = (self.pid, self.name, step.branch)
        entry = run.cache.get(key)
        leaves, structure = output_leaves(out)
        sig = input_signature(args, kwargs)
        if entry is None or entry.structure != structure or entry.signature != sig:
            entry = run.cache[key] = SiteEntry()
            entry.structure = structure
            entry.states = [None if t is None or not self.is_site else self._new_state(i) for i, t in enumerate(leaves)]
        entry.signature = sig
        entry.shapes = [None if t is None else (t.shape, t.dtype, t.device) for t in leaves]
        if self.is_site:
            run.count("computed", self.name)
            for s, t in zip(entry.states, leaves):
                if s is not None:
                    self.policy.store(s, t, step)
        return out


def install(target: Any, policy: Any) -> int:
    """Hook every site and feeder of every block; returns the number of sites."""
    chain = getattr(target, "step_chain", None)
    if chain is not None and getattr(chain.policy, "per_sample", False):
        raise ValueError("per_sample step gates cannot be composed with a module forecaster; drop per_sample or the module policy")
    if chain is not None and getattr(chain.policy, "residual_order", 0):
        raise ValueError("residual_order forecasts the cached span's residual, a module forecaster its sites: "
                         "use one of them (residual_order=0 with the module policy)")
    if any(getattr(p, "level", None) == "output" for p in target.policies if p is not policy):
        from dcache.installers.whole_model import OUTPUT_AND_MODULE

        raise ValueError(OUTPUT_AND_MODULE)
    count = 0
    for index, block in enumerate(target.blocks):
        spec = target.adapter.spec(block)
        for attr, is_site in [(a, True) for a in spec.sites] + [(a, False) for a in spec.feeders]:
            module = getattr(block, attr, None)
            if not isinstance(module, torch.nn.Module):
                continue
            target.hook(module, _Site(target, policy, target.names[module], is_site, index))
            count += is_site
    return count
