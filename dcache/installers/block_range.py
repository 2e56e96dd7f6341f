"""Block-level caching (granularity ``block``): each named block is computed or its residual reused.

On REUSE a block returns ``input + residual`` (and the same for its text stream), the residual
being ``output - input`` of that block at the branch's last computed step. Guard: a residual is
only reused for an input of its shape.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.installers._common import pack, same_shape, unpack
from dcache.pipelines.adapters.base import BlockSpec, get_arg
from dcache.wrapper import CALL


class BlockEntry:
    __slots__ = ("h_in", "e_in", "res_h", "res_e")

    def __init__(self) -> None:
        self.h_in = self.e_in = self.res_h = self.res_e = None

    def cache_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.res_h, self.res_e) if t is not None)


class _Block:
    def __init__(self, target: Any, policy: Any, index: int, block: torch.nn.Module, spec: BlockSpec) -> None:
        self.target, self.policy, self.index, self.block, self.spec = target, policy, index, block, spec
        self.pid = id(policy)
        self.name = target.names[block]

    def pre(self, args: tuple, kwargs: dict) -> Any:
        run, step = self.target.active()
        if step is None:
            return CALL
        state = run.state((self.pid, "state", step.branch), self.policy.new_state)
        entry = run.state((self.pid, self.index, step.branch), BlockEntry)
        hidden = get_arg(self.block, self.spec.hidden, args, kwargs)
        enc = get_arg(self.block, self.spec.encoder, args, kwargs) if self.spec.encoder else None
        key = (self.pid, self.index)
        compute = step.decisions.get(key) if step.sub > 0 else None
        if compute is None:
            compute = step.decisions[key] = bool(self.policy.decide(state, step, self.index, hidden))
        usable = same_shape(entry.res_h, hidden) and (entry.res_e is None or same_shape(entry.res_e, enc))
        if not compute and usable:
            run.count("reused", self.name)
            run.avoid(self.name)
            out_e = enc if (enc is None or entry.res_e is None) else enc + entry.res_e
            return pack(self.spec, hidden + entry.res_h, out_e)
        entry.h_in, entry.e_in = hidden, enc
        return CALL

    def post(self, args: tuple, kwargs: dict, out: Any) -> Any:
        run, step = self.target.active()
        if step is None:
            return out
        state = run.state((self.pid, "state", step.branch), self.policy.new_state)
        entry = run.state((self.pid, self.index, step.branch), BlockEntry)
        out_h, out_e = unpack(self.spec, out)
        entry.res_h = out_h - entry.h_in
        entry.res_e = None if (out_e is None or entry.e_in is None) else out_e - entry.e_in
        self.policy.after_compute(state, step, self.index, entry.h_in, out_h)
        entry.h_in = entry.e_in = None
        run.count("computed", self.name)
        return out


def install(target: Any, policy: Any) -> int:
    blocks = target.blocks
    count = 0
    for i in policy.blocks(len(blocks)):
        if not 0 <= i < len(blocks):
            raise ValueError(f"{type(policy).__name__}: block index {i} out of range for {len(blocks)} blocks")
        block = blocks[i]
        target.hook(block, _Block(target, policy, i, block, target.adapter.spec(block)))
        count += 1
    return count
