"""Guidance-level caching (granularity ``guidance``): a CFG branch is computed or produced.

An interceptor on the denoiser call. Branch 0 of every step is computed; for branch ≥ 1 the
policy decides. A produced prediction must have the shape of the branch-0 prediction of the
same step (guard), else the call is computed.
"""

from __future__ import annotations

from typing import Any

from dcache.installers.whole_model import sample_of, with_sample
from dcache.wrapper import CALL


class _Guidance:
    def __init__(self, target: Any, policy: Any) -> None:
        self.target, self.policy = target, policy
        self.pid = id(policy)
        self.site = f"{target.prefix}guidance"

    def _this_step(self, run: Any, step: Any) -> dict:
        d = run.cache.get((self.pid, "step"))
        if d is None or d[0] != step.index:
            d = run.cache[(self.pid, "step")] = (step.index, {}, {})
        return d

    def intercept(self, run: Any, step: Any, args: tuple, kwargs: dict) -> Any:
        if step.branch == 0:
            return CALL
        state = run.state((self.pid, "state"), self.policy.new_state)
        _, preds, outs = self._this_step(run, step)
        if 0 not in preds or self.policy.decide(state, step, step.branch):
            return CALL
        value = self.policy.produce(state, step, step.branch, dict(preds))
        if value is None or value.shape != preds[0].shape:
            return CALL
        run.count("reused", self.site)
        run.avoid(self.target.root_name)
        return with_sample(outs[0], value)

    def after(self, run: Any, step: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        state = run.state((self.pid, "state"), self.policy.new_state)
        _, preds, outs = self._this_step(run, step)
        pred = sample_of(out)
        preds[step.branch], outs[step.branch] = pred, out
        self.policy.store(state, step, step.branch, pred)
        if step.branch > 0:
            run.count("computed", self.site)
        return out


def install(target: Any, policy: Any) -> int:
    target.interceptors.append(_Guidance(target, policy))
    return 1
