"""CFG caching on both CFG layouts (granularity ``cfg-cache``), plus the policy's attention part.

An interceptor on the denoiser call. The conditional prediction is always computed; on steps the
policy does not compute the unconditional one it is rebuilt from this step's conditional
prediction (``policy.cfg_produce``), from what ``policy.cfg_store`` kept at the last step both
were computed.

* Two denoiser calls per step (Flux true-CFG, Wan, QwenImage, the embedded models): branch 0 is
  the conditional pass, branch 1 is produced instead of called.
* One call on a batch of 2B (SD, PixArt, SD3, CogVideoX, DiT): recognised by the two halves of
  the sample input being equal (the pipelines pass ``cat([latents] * 2)``); on a produced step
  the denoiser runs on the conditional half only (``adapter.batched_cfg_cond_half``) and the
  other half is rebuilt. Any other batch is computed as it is. Two prompts that start from
  the same latents have equal halves at step 0 only, which is always computed in full; their
  latents part after it, while batched CFG concatenates the same latents every step.
  (diffusers' FasterCache assumes this layout everywhere and fails with an IndexError on a
  sequential-CFG pipeline, where the batch is 1: shared/reference/diffusers-hooks.md §1.4.)

Predictions are handed to the policy as grids (..., H, W) for its FFT: image/video outputs as
they are, token outputs (B, N, C) through the adapter's ``token_grid``.

When the policy has attention ranges and no other policy owns the attention modules, its
attention part is installed as well (``dcache.installers.attention``). Composed with a step,
module or block policy (``policy=["taylorseer", "fastercache"]``) it leaves the features to
that policy and caches CFG only.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from dcache import wrapper
from dcache.installers import attention
from dcache.installers.whole_model import sample_of, with_sample
from dcache.pipelines.adapters.base import get_arg
from dcache.wrapper import CALL

logger = logging.getLogger("dcache")

# Configs of these granularities cache the blocks' features themselves.
_FEATURE_GRANULARITIES = ("step", "module", "block", "attention-output", "token")


def to_grid(adapter: Any, model: torch.nn.Module, pred: torch.Tensor, args: tuple, kwargs: dict):
    """(grid view (..., H, W) of ``pred``, function mapping such a grid back to ``pred``'s layout)."""
    if pred.ndim >= 4:
        return pred, lambda g: g
    if pred.ndim != 3:
        raise ValueError(f"cannot lay a prediction of shape {tuple(pred.shape)} out on a spatial grid")
    b, n, c = pred.shape
    grid = adapter.token_grid(model, args, kwargs)
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{adapter.family}: the spatial grid of {n} image tokens is unknown (token_grid)")
        grid = (1, side, side)
    f, h, w = grid
    if f * h * w != n:
        raise ValueError(f"{adapter.family}: token grid {grid} does not hold {n} tokens")
    g = pred.reshape(b, f, h, w, c).permute(0, 1, 4, 2, 3)
    return g, lambda x: x.permute(0, 1, 3, 4, 2).reshape(b, n, c)


def _take(v: Any, sl: slice, batch: int) -> Any:
    if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch:
        return v[sl]
    if isinstance(v, dict):
        return {k: _take(x, sl, batch) for k, x in v.items()}
    return v


class _CfgCache:
    def __init__(self, target: Any, policy: Any) -> None:
        self.target, self.policy = target, policy
        self.pid = id(policy)
        self.site = f"{target.prefix}uncond"

    # -- helpers -------------------------------------------------------------------------------
    def _sample(self, args: tuple, kwargs: dict) -> Any:
        m = self.target.denoiser
        x = get_arg(m, "hidden_states", args, kwargs)
        return x if isinstance(x, torch.Tensor) else get_arg(m, "sample", args, kwargs)

    def _batched(self, args: tuple, kwargs: dict) -> bool:
        x = self._sample(args, kwargs)
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] % 2:
            return False
        a, b = x.chunk(2, dim=0)
        return bool(torch.equal(a, b))

    def _state(self, run: Any) -> Any:
        return run.state((self.pid, "cfg"), self.policy.new_cfg_state)

    def _compute(self, run: Any, step: Any) -> bool:
        key = (self.pid, "cfg")
        d = step.decisions.get(key)
        if d is None:
            d = step.decisions[key] = bool(self.policy.cfg_compute(self._state(run), step))
        return d

    def _grids(self, pred: torch.Tensor, args: tuple, kwargs: dict):
        return to_grid(self.target.adapter, self.target.denoiser, pred, args, kwargs)

    def _produce(self, run: Any, step: Any, cond: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
        grid, back = self._grids(cond, args, kwargs)
        out = self.policy.cfg_produce(self._state(run), step, grid)
        return None if out is None else back(out).to(cond.dtype)

    def _store(self, run: Any, step: Any, cond: torch.Tensor, uncond: torch.Tensor, args: tuple, kwargs: dict) -> None:
        cg, _ = self._grids(cond, args, kwargs)
        ug, _ = self._grids(uncond, args, kwargs)
        self.policy.cfg_store(self._state(run), step, cg, ug)

    # -- the interceptor -----------------------------------------------------------------------
    def intercept(self, run: Any, step: Any, args: tuple, kwargs: dict) -> Any:
        if step.branch == 0:
            batched = self._batched(args, kwargs)
            run.cache[(self.pid, "batched")] = batched
            if not batched or self._compute(run, step) or not self.policy.cfg_ready(self._state(run)):
                return CALL
            return self._half_call(run, step, args, kwargs)
        if step.branch != 1:
            return CALL
        cond = run.cache.get((self.pid, "cond"))
        if cond is None or cond[0] != step.index or self._compute(run, step) \
                or not self.policy.cfg_ready(self._state(run)):
            return CALL
        x = self._sample(args, kwargs)
        if isinstance(x, torch.Tensor) and x.shape[0] != cond[1].shape[0]:
            return CALL  # guard: the branches differ in batch
        uncond = self._produce(run, step, cond[1], args, kwargs)
        if uncond is None or uncond.shape != cond[1].shape:
            return CALL
        run.count("reused", self.site)
        run.avoid(self.target.root_name)
        return with_sample(cond[2], uncond)

    def _half_call(self, run: Any, step: Any, args: tuple, kwargs: dict) -> Any:
        batch = self._sample(args, kwargs).shape[0]
        half = self.target.adapter.batched_cfg_cond_half
        sl = slice(half * (batch // 2), (half + 1) * (batch // 2))
        h_args = tuple(_take(a, sl, batch) for a in args)
        h_kwargs = {k: _take(v, sl, batch) for k, v in kwargs.items()}
        inner = self.target.denoiser.__dict__[wrapper._ATTR].inner
        run.cache[(self.pid, "half")] = half
        try:
            out = inner(*h_args, **h_kwargs)
        finally:
            run.cache.pop((self.pid, "half"), None)
        cond = sample_of(out)
        uncond = self._produce(run, step, cond, h_args, h_kwargs)
        if uncond is None:  # cannot happen after cfg_ready; compute the whole batch to be safe
            return inner(*args, **kwargs)
        full = torch.cat([uncond, cond] if half == 1 else [cond, uncond], dim=0)
        run.count("reused", self.site)
        run.avoid(self.target.root_name, 0.5)
        return with_sample(out, full)

    def after(self, run: Any, step: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        pred = sample_of(out)
        if step.branch == 0:
            if run.cache.get((self.pid, "batched")):
                half = self.target.adapter.batched_cfg_cond_half
                parts = pred.chunk(2, dim=0)
                batch = pred.shape[0]
                sl = slice(half * (batch // 2), (half + 1) * (batch // 2))
                h_args = tuple(_take(a, sl, batch) for a in args)
                h_kwargs = {k: _take(v, sl, batch) for k, v in kwargs.items()}
                self._store(run, step, parts[half], parts[1 - half], h_args, h_kwargs)
                run.count("computed", self.site)
            else:
                run.cache[(self.pid, "cond")] = (step.index, pred, out)
        elif step.branch == 1:
            cond = run.cache.get((self.pid, "cond"))
            if cond is not None and cond[0] == step.index and cond[1].shape == pred.shape:
                self._store(run, step, cond[1], pred, args, kwargs)
            run.count("computed", self.site)
        return out


def install(target: Any, policy: Any) -> int:
    name = policy.name
    others = [type(c).policy_name for c in target.handle.configs
              if getattr(type(c), "granularity", None) in _FEATURE_GRANULARITIES]
    hooked = 0
    if any(r > 0 for r in policy.ranges.values()):
        if others:
            if policy.attention_explicit:
                raise ValueError(
                    f"{name}: its attention reuse was asked for, but {others[0]!r} already caches the blocks' "
                    f"features; set {name}'s attention ranges to 0 (CFG-Cache only) or use {name} alone")
            logger.info("dcache: %s caches CFG only; %s owns the features", name, others[0])
            policy.ranges = {k: 0 for k in policy.ranges}
        else:
            hooked += attention.install(target, policy, name)
    target.interceptors.append(_CfgCache(target, policy))
    return hooked + 1
