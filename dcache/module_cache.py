"""Module-level caching: the attention/MLP sites inside each block are computed or forecast.

A site's output is taken where the block receives it, before the block multiplies it by the
gates it computed this step, so a forecast always meets fresh modulation. Feeders (modules whose
output only flows into a site, like Flux single blocks' ``attn``, ``proj_mlp`` and ``act_mlp``
into ``proj_out``) are skipped with their site: they return an empty placeholder (the recorded
shape with a last dimension of 0) instead of running.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.schedulers._base import Action, ModulePolicy


class SiteEntry:
    """Per (site, branch): the output's structure and one history per tensor leaf."""

    __slots__ = ("structure", "states", "shapes")

    def __init__(self) -> None:
        self.structure: Any = None
        self.states: list[Any] = []
        self.shapes: list[tuple | None] = []

    def cache_nbytes(self) -> int:
        return sum(s.cache_nbytes() for s in self.states if hasattr(s, "cache_nbytes"))


def _leaves(value: Any) -> tuple[list[torch.Tensor | None], Any]:
    if isinstance(value, torch.Tensor):
        return [value], "tensor"
    if isinstance(value, (tuple, list)) and all(v is None or isinstance(v, torch.Tensor) for v in value):
        return list(value), (type(value), len(value))
    raise TypeError(f"cannot cache a site output of type {type(value).__name__}")


def _rebuild(structure: Any, leaves: list[torch.Tensor | None]) -> Any:
    if structure == "tensor":
        return leaves[0]
    kind, _ = structure
    return kind(leaves)


def install_module_hooks(handle: Any, policy: ModulePolicy, blocks: list[torch.nn.Module]) -> int:
    """Hook every site and feeder of every block; returns the number of sites."""
    from dcache.engine import patch_step_hook

    pid = id(policy)
    count = 0

    def decision(run: Any, step: Any) -> Action:
        act = step.decisions.get(pid)
        if act is None:
            state = run.state((pid, "state", step.branch), policy.new_state)
            act = step.decisions[pid] = policy.action(state, step)
        return act

    def make_body(name: str, is_site: bool):
        def body(run: Any, step: Any, original: Any, args: tuple, kwargs: dict) -> Any:
            act = decision(run, step)
            key = (pid, name, step.branch)
            entry = run.cache.get(key)
            if act is not Action.COMPUTE and entry is not None:
                run.avoid(name)
                if is_site:
                    run.count("forecast", name)
                    leaves = [None if s is None else policy.produce(s, step) for s in entry.states]
                else:
                    # Feeders only flow into their site, which ignores its input on a
                    # forecast step: an empty last dimension keeps every shape check and
                    # concatenation valid while nothing is computed or materialised.
                    leaves = [None if sh is None else torch.empty((*sh[0][:-1], 0), dtype=sh[1], device=sh[2])
                              for sh in entry.shapes]
                return _rebuild(entry.structure, leaves)
            out = original(*args, **kwargs)
            leaves, structure = _leaves(out)
            if entry is None or entry.structure != structure:
                entry = run.cache[key] = SiteEntry()
                entry.structure = structure
                entry.states = [None if t is None or not is_site else policy.new_site_state() for t in leaves]
            entry.shapes = [None if t is None else (t.shape, t.dtype, t.device) for t in leaves]
            if is_site:
                run.count("computed", name)
                for s, t in zip(entry.states, leaves):
                    if s is not None:
                        policy.store(s, t, step)
            return out

        return body

    for block in blocks:
        spec = handle.adapter.spec(block)
        for attr, is_site in [(a, True) for a in spec.sites] + [(a, False) for a in spec.feeders]:
            module = getattr(block, attr, None)
            if not isinstance(module, torch.nn.Module):
                continue
            patch_step_hook(handle, module, make_body(handle.module_names[module], is_site))
            count += is_site
    return count
