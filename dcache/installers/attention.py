"""Attention-level caching (granularity ``attention-output``): attention modules computed or produced.

Hooks every attention module the adapter names (``BlockSpec.attention``) whose kind the policy
has a nonzero range for. The decision is taken once per (step, branch, kind) and shared by every
module of that kind; history is per (module, branch), so a guidance branch only ever receives its
own attention outputs (diffusers' PAB keeps one state per module across branches and hands the
conditional pass's output to the unconditional one: shared/reference/diffusers-hooks.md §1.4).

Guard: an output is produced only for a call with the leading input dimensions it had when it
was stored. One exception: during a batched-CFG call that runs only the conditional half of the
batch (FasterCache's CFG-Cache, which sets ``run.cache[(policy id, "half")]``), the stored full
batch is sliced to that half; a computed half is written back into the stored full batch.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.installers._common import input_signature, output_leaves, rebuild_output
from dcache.schedulers._attention import AttentionHistory
from dcache.schedulers._common import require_blocks
from dcache.wrapper import CALL

# Granularities whose policies hook the attention modules themselves: one of them per model.
_ATTENTION_OWNERS = ("module",)


def half_signature(sig: tuple, parts: int = 2) -> tuple:
    """The signature of the same call on 1/``parts`` of its batch."""
    out = []
    for s in sig:
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str):
            k, shape = s
            out.append((k, (shape[0] // parts, *shape[1:]) if shape else shape))
        else:
            out.append((s[0] // parts, *s[1:]) if s else s)
    return tuple(out)


class _Entry:
    __slots__ = ("history", "kind", "signature")

    def __init__(self, depth: int) -> None:
        self.history = AttentionHistory(depth)
        self.kind: Any = None
        self.signature: tuple | None = None

    def cache_nbytes(self) -> int:
        return self.history.cache_nbytes()


class _AttentionSite:
    def __init__(self, target: Any, policy: Any, name: str, kind: str) -> None:
        self.target, self.policy, self.name, self.kind = target, policy, name, kind
        self.pid = id(policy)

    def _reuse(self, run: Any, step: Any) -> bool:
        key = (self.pid, self.kind)
        d = step.decisions.get(key)
        if d is None:
            state = run.state((self.pid, "state", step.branch), self.policy.new_state)
            d = step.decisions[key] = bool(self.policy.reuse(state, step, self.kind))
            if not d:
                self.policy.computed(state, step, self.kind)
        return d

    def _half(self, run: Any) -> int | None:
        return run.cache.get((self.pid, "half"))

    def pre(self, args: tuple, kwargs: dict) -> Any:
        run, step = self.target.active()
        if step is None:
            return CALL
        if not self._reuse(run, step):
            return CALL
        entry = run.cache.get((self.pid, self.name, step.branch))
        if entry is None:
            return CALL
        sig = input_signature(args, kwargs)
        half = self._half(run)
        if entry.signature == sig:
            rows = None
        elif half is not None and half_signature(entry.signature) == sig:
            rows = half
        else:
            return CALL
        leaves = self.policy.produce(entry.history, step, self.kind)
        if leaves is None:
            return CALL
        if rows is not None:
            leaves = [None if t is None else t.chunk(2, dim=0)[rows] for t in leaves]
        run.count("reused", self.name)
        # Priced on the full call's FLOP table: during a half-batch call the module costs half.
        run.avoid(self.name, 1.0 if rows is None else 0.5)
        return rebuild_output(entry.kind, leaves)

    def post(self, args: tuple, kwargs: dict, out: Any) -> Any:
        run, step = self.target.active()
        if step is None:
            return out
        key = (self.pid, self.name, step.branch)
        entry = run.cache.get(key)
        leaves, kind = output_leaves(out, "an attention output")
        leaves = [None if t is None else t.detach() for t in leaves]
        sig = input_signature(args, kwargs)
        half = self._half(run)
        if (entry is not None and half is not None and entry.signature is not None
                and half_signature(entry.signature) == sig and entry.history.values):
            # Only the conditional half ran: write it into the stored full batch.
            merged = []
            for full, new in zip(entry.history.values[0], leaves):
                if full is None or new is None:
                    merged.append(new)
                    continue
                parts = list(full.chunk(2, dim=0))
                parts[half] = new
                merged.append(torch.cat(parts, dim=0))
            entry.history.push(merged, step.index)
        else:
            if entry is None or entry.kind != kind or entry.signature != sig:
                entry = run.cache[key] = _Entry(self.policy.history_depth)
                entry.kind, entry.signature = kind, sig
            entry.history.push(leaves, step.index)
        run.count("computed", self.name)
        return out


def attention_modules(target: Any, kinds: set[str]) -> list[tuple[torch.nn.Module, str]]:
    """(module, kind) of every attention module of the wanted kinds, in block order."""
    found = []
    for block in target.blocks:
        for attr, kind in target.adapter.spec(block).attention:
            module = getattr(block, attr, None)
            if kind in kinds and isinstance(module, torch.nn.Module):
                found.append((module, kind))
    return found


def check_no_attention_owner(target: Any, policy_name: str) -> None:
    others = [type(c).policy_name for c in target.handle.configs
              if getattr(type(c), "granularity", None) in _ATTENTION_OWNERS]
    if others:
        raise ValueError(
            f"{policy_name} reuses attention outputs and {others[0]!r} forecasts the same modules; "
            "combine one feature-level policy (step, module, block or attention) with one CFG policy")


def install(target: Any, policy: Any, name: str | None = None) -> int:
    name = name or getattr(policy, "name", None)
    require_blocks(target.adapter.has_blocks, target.adapter.family,
                   f"{name or 'this policy'} reuses attention outputs inside transformer blocks")
    check_no_attention_owner(target, name or "this policy")
    kinds = {k for k, r in policy.ranges.items() if r > 0}
    hooked = 0
    for module, kind in attention_modules(target, kinds):
        target.hook(module, _AttentionSite(target, policy, target.names[module], kind))
        hooked += 1
    return hooked
