"""Step-level caching over a transformer block chain (granularity ``step``).

The chain is split into head (always computed, FBCache's first blocks), span (computed or
reused as one residual) and tail (always computed). At the first span block the call reaches,
the policy decides: on COMPUTE the span runs and its residual is stored for the branch; on REUSE
the first span block returns ``input + residual`` and the other span blocks pass their inputs
through without running, so none of their inner layers is called.

Per-sample decisions (``policy.per_sample``; ``decide`` returns a bool per batch row): when only
some rows must compute, every span block runs on those rows only (each top-level tensor argument
whose first dimension is the batch is sliced) and its output is scattered back into the full
batch; at the last span block the other rows get their own cached residual.

The residual is the span's own contribution: ``out(last) - in(first)`` minus whatever the model
added *between* span blocks (Flux ControlNet's ``controlnet_block_samples``). On a reused step
the model adds this step's samples to the passed-through stream itself, so they count once.
Blocks a call skips (SD3 ``skip_layers``) are simply not seen; a call that skips the first span
block is computed and does not touch the cache.

Composed with a forecaster (a ``module`` policy installed on the same denoiser, e.g.
``["fbcache", "taylorseer"]``): the step policy is then only the gate. On a step it skips, the
span blocks run instead of being replaced by the residual, and ``module_sites`` gives their
attention/MLP sites the forecaster's values (``_Chain.forecasting``); on a computed step they run
and feed the forecaster's history. Head and tail blocks always compute.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.installers._common import pack, same_shape, unpack
from dcache.installers._residual import ResidualHistory
from dcache.pipelines.adapters.base import BlockSpec, get_arg
from dcache.wrapper import CALL, CallWith


class ChainState:
    """Per-branch bookkeeping of one chain (lives in the Run)."""

    __slots__ = ("policy_state", "call", "mode", "capture", "start", "probe", "h_in", "e_in", "prev_h", "prev_e",
                 "ext_h", "ext_e", "res_h", "res_e", "step", "rows", "block_in", "hist_h", "hist_e")

    def __init__(self, policy_state: Any, residual_order: int = 0, difference_from: int = 0) -> None:
        self.policy_state = policy_state
        self.call = -1
        self.res_h: torch.Tensor | None = None
        self.res_e: torch.Tensor | None = None
        # A gate with its own residual forecaster (``residual_order`` > 0) keeps Taylor terms.
        self.hist_h = ResidualHistory(residual_order, difference_from) if residual_order else None
        self.hist_e = ResidualHistory(residual_order, difference_from) if residual_order else None
        self.new_call(-1)

    def forget(self) -> None:
        """Drop every cached residual (the guard's re-seed)."""
        self.res_h = self.res_e = None
        if self.hist_h is not None:
            self.hist_h.reset()
            self.hist_e.reset()

    def residuals(self, step: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residuals a skipped step adds: the last computed ones, or their forecast."""
        if self.hist_h is None:
            return self.res_h, self.res_e
        res_e = self.hist_e.produce(step.index) if self.res_e is not None else None
        return self.hist_h.produce(step.index), res_e

    def new_call(self, call: int) -> None:
        self.call = call
        self.mode = "undecided"
        self.capture = False
        self.start = self.probe = self.h_in = self.e_in = self.prev_h = self.prev_e = None
        self.ext_h = self.ext_e = None
        self.step = None
        self.rows: torch.Tensor | None = None  # per-sample: the batch rows computed this call
        self.block_in: tuple | None = None

    def cache_nbytes(self) -> int:
        # Only the residuals and the policy's references outlive a step.
        if self.hist_h is not None:  # res_h / res_e are views of the histories' first terms
            own = self.hist_h.cache_nbytes() + self.hist_e.cache_nbytes()
        else:
            own = sum(t.numel() * t.element_size() for t in (self.res_h, self.res_e) if t is not None)
        ps = self.policy_state.cache_nbytes() if hasattr(self.policy_state, "cache_nbytes") else 0
        return own + ps


class _BlockSite:
    def __init__(self, chain: "_Chain", i: int, block: torch.nn.Module, spec: BlockSpec) -> None:
        self.chain, self.i, self.block, self.spec = chain, i, block, spec

    def pre(self, args: tuple, kwargs: dict) -> Any:
        ch = self.chain
        run, step = ch.target.active()
        if step is None:
            return CALL
        cs = ch.state(run, step)
        block, spec, i, policy = self.block, self.spec, self.i, ch.policy
        hidden = get_arg(block, spec.hidden, args, kwargs)
        enc = get_arg(block, spec.encoder, args, kwargs) if spec.encoder else None
        if i < ch.first:
            if cs.start is None:
                cs.start = hidden
            if policy.needs_probe and cs.probe is None:
                cs.probe = ch.target.adapter.teacache_probe(block, args, kwargs)
            return CALL
        if i > ch.last:
            return CALL
        if cs.mode == "undecided":
            if i != ch.first:
                cs.mode = "compute"  # the call skipped the decision block: compute, cache nothing
                return CALL
            return ch.decide(run, step, cs, block, args, kwargs, hidden, enc)
        if cs.mode == "reuse":
            return pack(spec, hidden, enc)
        if cs.capture:
            # Anything the model added between span blocks is not the span's residual.
            if cs.prev_h is not None and hidden is not cs.prev_h:
                d = hidden - cs.prev_h
                cs.ext_h = d if cs.ext_h is None else cs.ext_h + d
            if enc is not None and cs.prev_e is not None and enc is not cs.prev_e:
                d = enc - cs.prev_e
                cs.ext_e = d if cs.ext_e is None else cs.ext_e + d
        if cs.rows is not None:
            return _rows_call(cs, hidden, enc, args, kwargs)
        return CALL

    def post(self, args: tuple, kwargs: dict, out: Any) -> Any:
        ch = self.chain
        run, step = ch.target.active()
        if step is None or not (ch.first <= self.i <= ch.last):
            return out
        cs = ch.state(run, step)
        if cs.rows is not None and cs.mode == "compute":
            out = _scatter_rows(ch, cs, self.spec, out, self.i == ch.last)
        if cs.capture:
            cs.prev_h, cs.prev_e = unpack(self.spec, out)
            if self.i == ch.last:
                ch.finish(run, step, cs)
        return out


def _rows_call(cs: ChainState, hidden: torch.Tensor, enc: Any, args: tuple, kwargs: dict) -> CallWith:
    rows, batch = cs.rows, hidden.shape[0]

    def take(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return v.index_select(0, rows)
        return v

    cs.block_in = (hidden, enc)
    return CallWith(tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()})


def _scatter_rows(ch: "_Chain", cs: ChainState, spec: BlockSpec, out: Any, last: bool) -> Any:
    """Full-batch output of a block run on ``cs.rows``: computed rows from ``out``, the other rows
    carry their input through, plus (at the last span block) their cached residual."""
    h_full, e_full = cs.block_in
    out_h, out_e = unpack(spec, out)
    full_h = h_full.index_copy(0, cs.rows, out_h)
    full_e = None
    if out_e is not None:
        full_e = e_full.index_copy(0, cs.rows, out_e) if e_full is not None else None
    if last:
        keep = torch.ones(full_h.shape[0], dtype=torch.bool, device=full_h.device)
        keep[cs.rows] = False
        mask = keep.view(-1, *([1] * (full_h.dim() - 1)))
        cs.prev_h, cs.prev_e = full_h, full_e  # the residual update only reads the computed rows
        full_h = torch.where(mask, full_h + cs.res_h, full_h)
        if full_e is not None and cs.res_e is not None:
            full_e = torch.where(keep.view(-1, *([1] * (full_e.dim() - 1))), full_e + cs.res_e, full_e)
        ch.finish_rows(cs)
        return pack(spec, full_h, full_e if out_e is not None else None)
    return pack(spec, full_h, full_e if out_e is not None else None)


class _Chain:
    def __init__(self, target: Any, policy: Any) -> None:
        self.target, self.policy = target, policy
        n = len(target.blocks)
        self.first = policy.head_blocks
        self.last = n - policy.tail_blocks - 1
        if self.first > self.last:
            raise ValueError(f"{type(policy).__name__}: no blocks left to cache among {n}")
        self.pid = id(policy)
        self.span_names = [target.names[b] for b in target.blocks[self.first: self.last + 1]]
        self.site = f"{target.prefix}blocks[{self.first}:{self.last + 1}]"
        self._current: ChainState | None = None
        self._forecasting: bool | None = None
        # module_sites reads the gate from here (see the module docstring).
        target.step_chain = self

    @property
    def forecasting(self) -> bool:
        """A module policy on the same denoiser forecasts the span on skipped steps (decided on the
        first call, when every policy is installed)."""
        if self._forecasting is None:
            self._forecasting = any(getattr(p, "granularity", None) == "module" for p in self.target.policies)
        return self._forecasting

    def state(self, run: Any, step: Any) -> ChainState:
        # Every block of the chain asks for the same state during one call: keep it at hand
        # until the call ends (``end_call`` drops it, so no tensor outlives its Run).
        cs = self._current
        if cs is not None and cs.call == run.calls:
            return cs
        key = (self.pid, "chain", step.branch)
        cs = run.cache.get(key)
        if cs is None:
            cs = run.cache[key] = ChainState(self.policy.new_state(), getattr(self.policy, "residual_order", 0),
                                                getattr(self.policy, "difference_from", 0))
        if cs.call != run.calls:
            cs.new_call(run.calls)
        self._current = cs
        return cs

    def decide(self, run: Any, step: Any, cs: ChainState, block: Any, args: tuple, kwargs: dict,
               hidden: torch.Tensor, enc: torch.Tensor | None) -> Any:
        policy = self.policy
        key = (self.pid, "decision")
        compute = step.decisions.get(key) if step.sub > 0 else None
        rows = None
        if compute is None:
            if policy.needs_probe:
                signal = cs.probe if cs.probe is not None else self.target.adapter.teacache_probe(block, args, kwargs)
            elif getattr(policy, "needs_input", False):
                signal = hidden
            elif self.first > 0:
                signal = None if cs.start is None else hidden - cs.start
            else:
                signal = None
            if signal is None and (policy.needs_probe or self.first > 0):
                compute = True  # the head did not run this call: nothing to compare
            else:
                compute = policy.decide(cs.policy_state, step, signal)
            step.decisions[key] = compute
        if isinstance(compute, torch.Tensor):  # per-sample: a bool per batch row
            if bool(compute.all()):
                compute = True
            elif not bool(compute.any()):
                compute = False
            else:
                rows = compute.nonzero().flatten().to(hidden.device)
                compute = False  # the guard below decides whether the other rows can reuse
        cs.start = cs.probe = None
        if not compute and rows is None and self.forecasting:
            cs.mode = "forecast"  # the span runs; its sites return the forecaster's values
            run.count("forecast", self.site)
            return CALL
        if not compute and not (same_shape(cs.res_h, hidden) and (cs.res_e is None or same_shape(cs.res_e, enc))):
            # Guard: the batch or shape changed since the residual was cached (dynamic CFG drops the
            # uncond half mid-run). Compute and re-seed the policy's history.
            compute = True
            rows = None
            cs.policy_state.reset()
            cs.forget()
        if rows is not None:
            cs.mode, cs.capture, cs.step, cs.rows = "compute", True, step, rows
            cs.h_in, cs.e_in = hidden, enc
            run.count("computed", self.site)
            reused = 1.0 - rows.numel() / hidden.shape[0]
            for name in self.span_names:
                run.avoid(name, reused)
            return _rows_call(cs, hidden, enc, args, kwargs)
        if not compute:
            cs.mode = "reuse"
            run.count("reused", self.site)
            for name in self.span_names:
                run.avoid(name)
            res_h, res_e = cs.residuals(step)
            out_e = enc if (enc is None or res_e is None) else enc + res_e
            return pack(self.target.adapter.spec(block), hidden + res_h, out_e)
        cs.mode = "compute"
        # A policy that never reuses (`none`) keeps no residual: no subtraction, no cached tensor.
        cs.capture = not getattr(policy, "never_reuses", False)
        cs.step = step
        cs.h_in, cs.e_in = hidden, enc
        run.count("computed", self.site)
        return CALL

    def finish(self, run: Any, step: Any, cs: ChainState) -> None:
        """Store the span's residual (at its last block, or at the end of a call that skipped it)."""
        if not cs.capture or cs.prev_h is None:
            cs.capture = False
            return
        res_h = cs.prev_h - cs.h_in
        if cs.ext_h is not None:
            res_h = res_h - cs.ext_h
        res_e = None
        if cs.prev_e is not None and cs.e_in is not None:
            res_e = cs.prev_e - cs.e_in
            if cs.ext_e is not None:
                res_e = res_e - cs.ext_e
        if cs.hist_h is not None:
            cs.hist_h.store(res_h, step.index)
            res_h = cs.hist_h.terms[0]
            if res_e is not None:
                cs.hist_e.store(res_e, step.index)
                res_e = cs.hist_e.terms[0]
        cs.res_h, cs.res_e = res_h, res_e
        self.policy.after_compute(cs.policy_state, step, cs.h_in, cs.prev_h)
        cs.capture = False
        cs.h_in = cs.e_in = cs.prev_h = cs.prev_e = cs.ext_h = cs.ext_e = None

    def finish_rows(self, cs: ChainState) -> None:
        """Per-sample: refresh the residual of the computed rows only."""
        rows = cs.rows
        res_h = cs.prev_h - cs.h_in
        if cs.ext_h is not None:
            res_h = res_h - cs.ext_h
        cs.res_h = cs.res_h.index_copy(0, rows, res_h.index_select(0, rows))
        if cs.res_e is not None and cs.prev_e is not None and cs.e_in is not None:
            res_e = cs.prev_e - cs.e_in
            if cs.ext_e is not None:
                res_e = res_e - cs.ext_e
            cs.res_e = cs.res_e.index_copy(0, rows, res_e.index_select(0, rows))
        self.policy.after_compute(cs.policy_state, cs.step, cs.h_in, cs.prev_h)
        cs.capture = False
        cs.h_in = cs.e_in = cs.prev_h = cs.prev_e = cs.ext_h = cs.ext_e = None
        cs.rows = cs.block_in = None

    def end_call(self, run: Any, step: Any) -> None:
        self._current = None
        cs = run.cache.get((self.pid, "chain", step.branch))
        if cs is not None and cs.call == run.calls and cs.capture:
            self.finish(run, step, cs)


def install(target: Any, policy: Any) -> int:
    """Hook every block of ``target``'s chain; returns 1 (the span is one site)."""
    blocks = target.blocks
    if not blocks:
        return 0
    if getattr(policy, "per_sample", False) and any(getattr(p, "granularity", None) == "module" for p in target.policies):
        raise ValueError("per_sample step gates cannot be composed with a module forecaster; drop per_sample or the module policy")
    if getattr(policy, "residual_order", 0) and any(getattr(p, "granularity", None) == "module" for p in target.policies):
        raise ValueError("residual_order forecasts the cached span's residual, a module forecaster its sites: "
                         "use one of them (residual_order=0 with the module policy)")
    chain = _Chain(target, policy)
    for i, block in enumerate(blocks):
        target.hook(block, _BlockSite(chain, i, block, target.adapter.spec(block)))
    target.end_call.append(chain.end_call)
    return 1
