"""Token-subset caching (granularity ``token``): on a partial step only chosen tokens are recomputed.

Sites and their kinds come from the adapter (``BlockSpec.token_sites``). On a full step every
site runs on all tokens and its cache is refreshed: the full output, the input, and for each
token the step it was last computed at. On a partial step:

- ``mlp`` and ``cross`` sites: ``pre`` scores the tokens of the site's input (the policy's
  ``score``), gathers the top ``fraction`` of them, and the module runs on those tokens only;
  ``post`` scatters the result into the cached full output, which becomes the new cache. This is
  exact per token: an MLP acts on each token alone, and a cross-attention query attends to the
  unchanged text keys/values, so a recomputed token gets exactly the value a full call would
  give it (its K/V projections still run in full and are not counted as avoided).
- ``self`` sites (self/joint attention): a query subset would still need every key and value,
  and a module-agnostic way to compute attention for some queries only (each family's processor
  applies rotary embeddings and norms itself) is not built. They are recomputed in full
  (fraction 1) or reused in full (fraction 0), which is what ToCa's recommended schedules do:
  its attention module factor is 0, the compute moved to the MLP (shared/reference/
  caching-algorithms.md §4.1).
- ``follows:<attr>`` sites run on the tokens chosen by site ``attr`` of the same block in the
  same call (Flux single blocks: ``proj_out`` takes the tokens ``proj_mlp`` recomputed, so the
  MLP half of its input is fresh wherever its output is).

The guard: a partial step needs a cache made for an input of this call's leading dimensions
(batch, tokens); otherwise the site computes in full and re-seeds its cache. State is per
(policy, site, branch), so the two calls of a two-pass CFG step never share a cache.
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.installers._common import cached_entry, input_signature, step_action
from dcache.kernels import token_gather
from dcache.schedulers._common import Action
from dcache.schedulers._token import SITE_KINDS, num_tokens
from dcache.wrapper import CALL, CallWith

_INPUT_NAMES = ("hidden_states", "input")


class TokenEntry:
    """Cache of one (site, branch): full output, input per token, step each token was last computed."""

    __slots__ = ("signature", "out", "x_ref", "last", "idx", "call")

    def __init__(self) -> None:
        self.signature: tuple | None = None
        self.out: Any = None
        self.x_ref: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None  # tokens chosen in call ``call`` (None: all)
        self.call = -1

    def cache_nbytes(self) -> int:
        total = 0
        for t in (self.out if isinstance(self.out, tuple) else (self.out,)) + (self.x_ref, self.last):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        return total


def _token_input(args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor | None]:
    """Where the token stream is in the call (position 0 or a keyword) and the tensor itself."""
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    for name in _INPUT_NAMES:
        if isinstance(kwargs.get(name), torch.Tensor):
            return name, kwargs[name]
    return None, None


def _replace(args: tuple, kwargs: dict, where: Any, value: torch.Tensor) -> tuple[tuple, dict]:
    if where == 0:
        return (value,) + tuple(args[1:]), kwargs
    return args, {**kwargs, where: value}


class _TokenSite:
    def __init__(self, target: Any, policy: Any, name: str, kind: str, leader: str | None,
                 kv_names: tuple[str, ...]) -> None:
        self.target, self.policy, self.name, self.kind, self.leader = target, policy, name, kind, leader
        self.kv_names = kv_names  # cross attention: projections that run in full on a partial step
        self.pid = id(policy)
        self._pending: Any = None  # what ``post`` does with this call: None (full) or (idx, gathered x)

    def _action(self, run: Any, step: Any) -> Action:
        return step_action(run, step, self.pid, self.policy)

    def pre(self, args: tuple, kwargs: dict) -> Any:
        self._pending = None
        found = cached_entry(self, args, kwargs)
        if found is None:
            return CALL
        run, step, entry = found
        if self.kind == "self":
            if self.policy.fraction("self", step) >= 1.0:
                return CALL
            run.count("reused", self.name)
            run.avoid(self.name)
            n = entry.last.numel() if entry.last is not None else 0
            run.count_tokens(self.name, 0, n)
            return entry.out
        where, x = _token_input(args, kwargs)
        if entry.x_ref is None or x is None or x.shape != entry.x_ref.shape:
            return CALL
        b, n = x.shape[0], x.shape[1]
        if self.leader is not None:
            lead = run.cache.get((self.pid, self.leader, step.branch))
            if lead is None or lead.call != run.calls or lead.idx is None or lead.idx.shape[0] != b:
                return CALL
            idx = lead.idx
            if idx.shape[1] == 0:
                self._account(run, b, 0, n)
                return entry.out
        else:
            k = num_tokens(self.policy.fraction(self.kind, step), n)
            if k == 0:
                entry.idx, entry.call = idx = x.new_zeros((b, 0), dtype=torch.long), run.calls
                self._account(run, b, 0, n)
                return entry.out
            stale = (step.index - entry.last).to(torch.float32)
            scores = self.policy.score(x, entry.x_ref, stale, step)
            # Sorted indices: at k == n the gather is the identity and the result bitwise exact.
            idx = torch.topk(scores, k, dim=1).indices.sort(dim=1).values
        entry.idx, entry.call = idx, run.calls
        xs = token_gather.gather(x, idx)
        self._pending = (idx, xs)
        a2, k2 = _replace(args, kwargs, where, xs)
        return CallWith(a2, k2)

    def _account(self, run: Any, b: int, k: int, n: int) -> None:
        run.count("reused", self.name)
        skipped = 1.0 - k / n if n else 0.0
        run.avoid(self.name, skipped)
        for kv in self.kv_names:
            run.avoid(kv, -skipped)  # K/V of the text run in full whatever the query subset
        run.count_tokens(self.name, b * k, b * n)

    def post(self, args: tuple, kwargs: dict, out: Any) -> Any:
        run, step = self.target.active()
        if step is None:
            return out
        key = (self.pid, self.name, step.branch)
        pending, self._pending = self._pending, None
        if pending is not None:
            entry = run.cache[key]
            idx, xs = pending
            full = token_gather.scatter(entry.out, idx, out)
            entry.out = full
            entry.x_ref = token_gather.scatter(entry.x_ref, idx, xs.detach())
            entry.last = entry.last.scatter(1, idx, step.index)
            self._account(run, idx.shape[0], idx.shape[1], full.shape[1])
            return full
        # A full call: re-seed the cache.
        entry = run.cache.get(key)
        if entry is None:
            entry = run.cache[key] = TokenEntry()
        entry.signature = input_signature(args, kwargs)
        entry.out = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out) if isinstance(out, tuple) \
            else out.detach() if isinstance(out, torch.Tensor) else out
        _, x = _token_input(args, kwargs)
        tokenable = (self.kind != "self" and isinstance(out, torch.Tensor) and isinstance(x, torch.Tensor)
                     and x.dim() == 3 and out.dim() == 3 and out.shape[:2] == x.shape[:2])
        entry.x_ref = x.detach() if tokenable else None
        lead = x if tokenable else (out[0] if isinstance(out, tuple) else out)
        entry.last = (torch.full(lead.shape[:2], step.index, dtype=torch.long, device=lead.device)
                      if isinstance(lead, torch.Tensor) and lead.dim() >= 2 else None)
        entry.idx, entry.call = None, run.calls
        run.count("computed", self.name)
        if entry.last is not None:
            run.count_tokens(self.name, entry.last.numel(), entry.last.numel())
        return out


def _parse(kind: str) -> tuple[str, str | None]:
    if kind.startswith("follows:"):
        return "follows", kind.split(":", 1)[1]
    if kind not in SITE_KINDS:
        raise ValueError(f"token site kind must be one of {SITE_KINDS} or 'follows:<attr>', got {kind!r}")
    return kind, None


def token_families() -> list[str]:
    """Families whose adapters declare token sites (for the error on the others)."""
    from dcache.pipelines.adapters import _FACTORIES

    fams = set()
    for make in _FACTORIES.values():
        adapter = make()
        if any(spec.token_sites for spec in adapter.block_specs.values()):
            fams.add(adapter.family)
    return sorted(fams)


def install(target: Any, policy: Any) -> int:
    """Hook every token site of every block; returns the number of sites (followers included)."""
    if not any(target.adapter.spec(b).token_sites for b in target.blocks):
        raise ValueError(
            f"token-subset policies need token sites in the adapter's block specs; {target.adapter.family} "
            f"declares none. Supported families: {', '.join(token_families())}")
    count = 0
    for block in target.blocks:
        for attr, kind in target.adapter.spec(block).token_sites:
            module = getattr(block, attr, None)
            if not isinstance(module, torch.nn.Module):
                continue
            base, leader_attr = _parse(kind)
            leader = None
            if leader_attr is not None:
                lead_mod = getattr(block, leader_attr, None)
                if not isinstance(lead_mod, torch.nn.Module):
                    continue
                leader = target.names[lead_mod]
            kv = ()
            if base == "cross":
                kv = tuple(target.names[m] for a in ("to_k", "to_v", "add_k_proj", "add_v_proj")
                           if isinstance(m := getattr(module, a, None), torch.nn.Module))
            target.hook(module, _TokenSite(target, policy, target.names[module], base, leader, kv))
            count += 1
    return count
