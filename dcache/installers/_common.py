"""Small helpers shared by installers: stream packing, the batch/shape guard, per-step actions."""

from __future__ import annotations

from typing import Any

import torch

from dcache.pipelines.adapters.base import BlockSpec
from dcache.schedulers._common import Action


def pack(spec: BlockSpec, hidden: Any, encoder: Any) -> Any:
    if len(spec.returns) == 1:
        return hidden
    return tuple(hidden if r == "hidden" else encoder for r in spec.returns)


def unpack(spec: BlockSpec, out: Any) -> tuple[Any, Any]:
    if len(spec.returns) == 1:
        return out, None
    d = dict(zip(spec.returns, out))
    return d["hidden"], d.get("encoder")


def same_shape(cached: torch.Tensor | None, current: torch.Tensor | None) -> bool:
    """The guard before any reuse/forecast: a cached tensor is only used for a call of its shape."""
    if cached is None or current is None:
        return cached is None and current is None
    return cached.shape == current.shape


def input_signature(args: tuple, kwargs: dict) -> tuple:
    """Leading dimensions (batch, tokens, ...) of every top-level tensor input of a call.

    The last dimension is left out: a site fed by skipped feeders receives empty placeholders.
    """
    sig = [tuple(a.shape[:-1]) for a in args if isinstance(a, torch.Tensor)]
    sig += [(k, tuple(v.shape[:-1])) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return tuple(sig)


def step_action(run: Any, step: Any, pid: int, policy: Any) -> Any:
    """The policy's action for this denoiser call, decided once (by its first site) and shared by
    every site it hooks; its state is per guidance branch."""
    act = step.decisions.get(pid)
    if act is None:
        state = run.state((pid, "state", step.branch), policy.new_state)
        act = step.decisions[pid] = policy.action(state, step)
    return act


def output_leaves(value: Any, what: str = "a site output") -> tuple[list[torch.Tensor | None], Any]:
    """A module's output as a flat list of tensors plus its structure, for :func:`rebuild_output`."""
    if isinstance(value, torch.Tensor):
        return [value], "tensor"
    if isinstance(value, (tuple, list)) and all(v is None or isinstance(v, torch.Tensor) for v in value):
        return list(value), (type(value), len(value))
    raise TypeError(f"cannot cache {what} of type {type(value).__name__}")


def rebuild_output(structure: Any, leaves: list[torch.Tensor | None]) -> Any:
    if structure == "tensor":
        return leaves[0]
    kind, _ = structure
    return kind(leaves)


def cached_entry(site: Any, args: tuple, kwargs: dict) -> tuple[Any, Any, Any] | None:
    """``(run, step, entry)`` when this call may use the site's cached entry; ``None`` when it must
    run: no call in progress, the policy computes this step, nothing cached for the branch, or the
    input's shape differs from the cached one (the guard)."""
    run, step = site.target.active()
    if step is None:
        return None
    act = site._action(run, step)
    entry = run.cache.get((site.pid, site.name, step.branch))
    if act is Action.COMPUTE or entry is None or entry.signature != input_signature(args, kwargs):
        return None
    return run, step, entry
