"""Step-level caching over a transformer block chain.

The chain is split into head (always computed, FBCache's first blocks), span (computed or
reused as one residual) and tail (always computed). At the first span block the policy decides:
on COMPUTE the span runs and its residual ``out - in`` is stored for the branch; on REUSE the
first span block returns ``in + residual`` and the other span blocks pass their inputs through
without running, so none of their inner layers is called.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.pipelines.adapters.base import BlockSpec, get_arg
from dcache.schedulers._base import StepPolicy


class ChainState:
    """Per-branch bookkeeping of one chain (lives in the Run)."""

    __slots__ = ("policy_state", "mode", "start", "probe", "h_in", "e_in", "res_h", "res_e")

    def __init__(self, policy_state: Any) -> None:
        self.policy_state = policy_state
        self.mode = "compute"
        self.start: torch.Tensor | None = None
        self.probe: torch.Tensor | None = None
        self.h_in: torch.Tensor | None = None
        self.e_in: torch.Tensor | None = None
        self.res_h: torch.Tensor | None = None
        self.res_e: torch.Tensor | None = None

    def reset(self) -> None:
        self.policy_state.reset()
        self.mode = "compute"
        self.start = self.probe = self.h_in = self.e_in = self.res_h = self.res_e = None

    def cache_nbytes(self) -> int:
        # Only the residuals and the policy's references outlive a step.
        own = sum(t.numel() * t.element_size() for t in (self.res_h, self.res_e) if t is not None)
        ps = self.policy_state.cache_nbytes() if hasattr(self.policy_state, "cache_nbytes") else 0
        return own + ps


def pack(spec: BlockSpec, hidden: Any, encoder: Any) -> Any:
    if len(spec.returns) == 1:
        return hidden
    return tuple(hidden if r == "hidden" else encoder for r in spec.returns)


def unpack(spec: BlockSpec, out: Any) -> tuple[Any, Any]:
    if len(spec.returns) == 1:
        return out, None
    d = dict(zip(spec.returns, out))
    return d["hidden"], d.get("encoder")


def install_step_hooks(handle: Any, policy: StepPolicy, blocks: list[torch.nn.Module]) -> None:
    from dcache.engine import patch_step_hook

    adapter = handle.adapter
    n = len(blocks)
    first = policy.head_blocks
    last = n - policy.tail_blocks - 1
    if first > last:
        raise ValueError(f"{type(policy).__name__}: no blocks left to cache among {n}")
    pid = id(policy)
    span_names = [handle.module_names[b] for b in blocks[first : last + 1]]
    site = f"blocks[{first}:{last + 1}]"

    def make_body(i: int, block: torch.nn.Module, spec: BlockSpec):
        def body(run: Any, step: Any, original: Any, args: tuple, kwargs: dict) -> Any:
            cs = run.state((pid, "chain", step.branch), lambda: ChainState(policy.new_state()))
            hidden = get_arg(block, spec.hidden, args, kwargs)
            enc = get_arg(block, spec.encoder, args, kwargs) if spec.encoder else None
            if i == 0:
                cs.mode = "compute"
                cs.start = hidden
                cs.probe = adapter.teacache_probe(block, args, kwargs) if policy.needs_probe else None
            if i == first:
                if policy.needs_probe:
                    signal = cs.probe
                elif first > 0:
                    signal = hidden - cs.start
                else:
                    signal = None
                compute = policy.decide(cs.policy_state, step, signal)
                cs.start = cs.probe = None
                if not compute and (cs.res_h is None or cs.res_h.shape != hidden.shape):
                    compute = True
                cs.mode = "compute" if compute else "reuse"
                if not compute:
                    run.count("reused", site)
                    for name in span_names:
                        run.avoid(name)
                    out_e = enc if (enc is None or cs.res_e is None) else enc + cs.res_e
                    return pack(spec, hidden + cs.res_h, out_e)
                run.count("computed", site)
                cs.h_in, cs.e_in = hidden, enc
            elif first < i <= last and cs.mode == "reuse":
                return pack(spec, hidden, enc)
            out = original(*args, **kwargs)
            if i == last and cs.mode == "compute":
                out_h, out_e = unpack(spec, out)
                cs.res_h = out_h - cs.h_in
                cs.res_e = None if (out_e is None or cs.e_in is None) else out_e - cs.e_in
                policy.after_compute(cs.policy_state, step, cs.h_in, out_h)
                cs.h_in = cs.e_in = None
            return out

        return body

    for i, block in enumerate(blocks):
        patch_step_hook(handle, block, make_body(i, block, adapter.spec(block)))
