"""UNet skip-branch caching (granularity ``unet_branch``, DeepCache).

An interceptor on the denoiser call takes the step's decision before any block runs. On a full
step everything runs and the ``hidden_states`` entering the branch's up block (the deep feature)
is stored per guidance branch. On a cached step the modules beneath the branch (adapter:
``deep_modules``) return shape-only placeholders without running — the UNet's own code between
blocks still sees tensors of the right shapes and skip tuples of the right lengths — and the
branch's up block is called with the stored feature instead of what it was handed. Guard: the
feature is only used for a ``sample`` of the shape it was computed for; otherwise the step is full.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.pipelines.adapters.base import get_arg
from dcache.wrapper import CALL, CallWith


def _placeholder(like: tuple) -> torch.Tensor:
    # A broadcast zero: the right shape, no memory, never read by anything that runs.
    shape, dtype, device = like
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def _like(t: torch.Tensor) -> tuple:
    return (t.shape, t.dtype, t.device)


class _Decision:
    """Denoiser interceptor: one decision per (step, guidance branch), before any block runs."""

    def __init__(self, target: Any, policy: Any) -> None:
        self.target, self.policy, self.pid = target, policy, id(policy)

    def intercept(self, run: Any, step: Any, args: tuple, kwargs: dict) -> Any:
        key = (self.pid, "full")
        full = step.decisions.get(key) if step.sub > 0 else None
        if full is None:
            state = run.state((self.pid, "state", step.branch), self.policy.new_state)
            full = bool(self.policy.decide(state, step))
            cached = run.cache.get((self.pid, "feature", step.branch))
            sample = get_arg(self.target.denoiser, "sample", args, kwargs)
            if not full and (cached is None or sample is None or cached["sample"] != tuple(sample.shape)):
                full = True  # guard: no feature yet, or one computed for another batch/size
            if full:
                shape = None if sample is None else tuple(sample.shape)
                run.cache[(self.pid, "feature", step.branch)] = {"sample": shape}
            step.decisions[key] = full
        return CALL

    def after(self, run: Any, step: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        return out


class _Deep:
    """A module beneath the branch: skipped on cached steps, its output shapes noted on full ones."""

    def __init__(self, target: Any, policy: Any, kind: str, module: torch.nn.Module) -> None:
        self.target, self.pid, self.kind = target, id(policy), kind
        self.name = target.names[module]

    def pre(self, args: tuple, kwargs: dict) -> Any:
        run, step = self.target.active()
        if step is None or step.decisions.get((self.pid, "full"), True):
            return CALL
        shapes = run.cache[(self.pid, "feature", step.branch)].get(self.name)
        if shapes is None:  # cannot happen after a full step of this shape; compute rather than guess
            return CALL
        run.avoid(self.name)
        if self.kind == "down":
            hidden, skips = shapes
            return _placeholder(hidden), tuple(_placeholder(s) for s in skips)
        return _placeholder(shapes)

    def post(self, args: tuple, kwargs: dict, out: Any) -> Any:
        run, step = self.target.active()
        if step is not None:
            entry = run.cache[(self.pid, "feature", step.branch)]
            if self.kind == "down":
                entry[self.name] = (_like(out[0]), tuple(_like(s) for s in out[1]))
            else:
                entry[self.name] = _like(out)
        return out


class _BranchUp:
    """The up block at the branch: stores its input on full steps, gets the stored one otherwise."""

    def __init__(self, target: Any, policy: Any, module: torch.nn.Module) -> None:
        self.target, self.pid, self.module = target, id(policy), module
        self.site = f"{target.prefix}branch{policy.branch}"

    def pre(self, args: tuple, kwargs: dict) -> Any:
        run, step = self.target.active()
        if step is None:
            return CALL
        entry = run.cache[(self.pid, "feature", step.branch)]
        if step.decisions.get((self.pid, "full"), True):
            entry["feature"] = get_arg(self.module, "hidden_states", args, kwargs)
            run.count("computed", self.site)
            return CALL
        run.count("reused", self.site)
        feature = entry["feature"]
        if "hidden_states" in kwargs:
            return CallWith(args, dict(kwargs, hidden_states=feature))
        return CallWith((feature,) + tuple(args[1:]), kwargs)

    def post(self, args: tuple, kwargs: dict, out: Any) -> Any:
        return out


def install(target: Any, policy: Any) -> int:
    adapter, model = target.adapter, target.denoiser
    if not hasattr(adapter, "skip_branches"):
        raise ValueError(f"policy granularity 'unet_branch' (DeepCache) needs a UNet2DConditionModel; "
                         f"got {type(model).__name__} ({adapter.family} adapter)")
    n = adapter.skip_branches(model)
    if not 0 <= policy.branch < n:
        raise ValueError(f"deepcache: cache_branch_id must be in [0, {n - 1}] for this UNet ({n} down blocks), "
                         f"got {policy.branch}")
    target.interceptors.append(_Decision(target, policy))
    hooked = 0
    for kind, module in adapter.deep_modules(model, policy.branch):
        target.hook(module, _Deep(target, policy, kind, module))
        hooked += 1
    up = adapter.branch_up_block(model, policy.branch)
    target.hook(up, _BranchUp(target, policy, up))
    return hooked + 1
