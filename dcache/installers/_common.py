"""Small helpers shared by installers: stream packing, the batch/shape guard, per-step actions."""

from __future__ import annotations

from typing import Any

import torch

from dcache.pipelines.adapters.base import BlockSpec


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
