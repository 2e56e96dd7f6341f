"""Step-level caching of a model without a block chain (UNets): reuse its last output.

An interceptor on the denoiser call: on REUSE the call returns the branch's last computed output
without running the model. Guard: only an output of the current sample's shape is reused.

Also used on models with a block chain when the step policy asks for it (``static(level="output")``):
then a skipped step runs nothing of the denoiser, not even its embedders and output projection.
A policy with ``residual_order`` > 0 gets the Taylor forecast of the output instead of the last
one (``_residual.ResidualHistory``, per branch).
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.installers._residual import ResidualHistory
from dcache.pipelines.adapters.base import get_arg
from dcache.wrapper import CALL


def sample_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


def with_sample(template: Any, sample: torch.Tensor) -> Any:
    if isinstance(template, tuple):
        return (sample,) + tuple(template[1:])
    if isinstance(template, torch.Tensor):
        return sample
    return type(template)(sample=sample)


class _WholeModel:
    def __init__(self, target: Any, policy: Any) -> None:
        self.target, self.policy = target, policy
        self.pid = id(policy)
        self.site = f"{target.prefix}model"

    def intercept(self, run: Any, step: Any, args: tuple, kwargs: dict) -> Any:
        t, policy = self.target, self.policy
        state = run.state((self.pid, "state", step.branch), policy.new_state)
        key = (self.pid, "decision")
        compute = step.decisions.get(key) if step.sub > 0 else None
        if compute is None:
            signal = t.adapter.model_probe(t.denoiser, args, kwargs) if policy.needs_probe else None
            compute = policy.decide(state, step, signal)
            # Per-sample decisions are reduced here: a UNet call computes every row or none.
            compute = step.decisions[key] = bool(compute.any()) if isinstance(compute, torch.Tensor) else bool(compute)
        cached = run.cache.get((self.pid, "output", step.branch))
        sample = get_arg(t.denoiser, "sample", args, kwargs)
        if not compute and cached is not None and (sample is None or cached[0].shape == sample.shape):
            run.count("reused", self.site)
            run.avoid(t.root_name)
            if len(cached) > 2:
                return with_sample(cached[1], cached[2].produce(step.index).to(cached[0].dtype))
            return with_sample(cached[1], cached[0])
        if not compute:
            state.reset()  # guard: the batch changed, compute and re-seed
        return CALL

    def after(self, run: Any, step: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        if not getattr(self.policy, "never_reuses", False):
            key = (self.pid, "output", step.branch)
            sample = sample_of(out)
            order = getattr(self.policy, "residual_order", 0)
            if order:
                old = run.cache.get(key)
                hist = old[2] if old is not None and len(old) > 2 else ResidualHistory(order, self.policy.difference_from)
                hist.store(sample, step.index)
                run.cache[key] = (sample, out, hist)
            else:
                run.cache[key] = (sample, out)
        run.count("computed", self.site)
        return out


OUTPUT_AND_MODULE = ("a step policy at level 'output' skips the whole denoiser call, so a module forecaster "
                     "has nothing to forecast into: use level='residual' with it, or drop the module policy")


def install(target: Any, policy: Any) -> int:
    if any(getattr(p, "granularity", None) == "module" for p in target.policies):
        raise ValueError(OUTPUT_AND_MODULE)
    target.interceptors.append(_WholeModel(target, policy))
    return 1
