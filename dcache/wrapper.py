"""The one hook wrapper every dcache-hooked forward goes through.

A :class:`Hook` replaces ``module.forward`` on the instance (never on the class). Each call runs
in three parts:

1. ``site.pre(args, kwargs)`` — decision and bookkeeping, under ``torch.compiler.disable``. It
   returns :data:`CALL` to run the module, or the value to return instead (a reused residual, a
   forecast, a pass-through).
2. the original forward — outside the disabled region, so a compiled block is traced and compiled.
3. ``site.post(args, kwargs, out)`` — bookkeeping on the fresh output, again under ``disable``.

While the owner is idle (policy ``none``) and dynamo is tracing, the hook is a plain call of the
original forward: nothing to graph-break on, so ``fullgraph=True`` compiles.

Stacking: the hook is an object, not a closure. When something else wrapped ``forward`` after
dcache (accelerate's offload hooks, diffusers' HookRegistry), removing dcache cannot unwrap the
outer layer; the hook then turns inert (a pass-through to what it wrapped) and stays where it is,
so the outer layer keeps working. ``copy.deepcopy`` and pickling give an inert hook bound to the
copy, so a copied or re-loaded model computes with its own weights.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

_MISSING = object()
CALL = object()  # returned by ``pre``: run the original forward


class CallWith:
    """Returned by ``pre``: run the original forward on these arguments (a sub-batch); ``post``
    still receives the call's own arguments, to scatter the result back."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs = args, kwargs
_ATTR = "_dcache_hook"


class Site(Protocol):
    def pre(self, args: tuple, kwargs: dict) -> Any: ...

    def post(self, args: tuple, kwargs: dict, out: Any) -> Any: ...


# Named in dynamo's error when a caching policy meets torch.compile(fullgraph=True).
REASON = ("dcache's caching decision depends on the data and cannot be traced: compile the blocks "
          "(regional compile: pipe.transformer.compile_repeated_blocks()) or use fullgraph=False; "
          "policy 'none' compiles with fullgraph=True")


@torch.compiler.disable(reason=REASON)
def _pre(site: Site, args: tuple, kwargs: dict) -> Any:
    return site.pre(args, kwargs)


@torch.compiler.disable(reason=REASON)
def _post(site: Site, args: tuple, kwargs: dict, out: Any) -> Any:
    return site.post(args, kwargs, out)


class Hook:
    """Callable that stands in for ``module.forward``."""

    def __init__(self, module: torch.nn.Module, site: Site | None, owner: Any = None) -> None:
        self.module = module
        self.site = site
        self.owner = owner  # anything with an ``idle`` attribute (the engine's handle)
        self.saved = module.__dict__.get("forward", _MISSING)
        self.inner = module.forward  # what this hook wraps: the bound class forward or an earlier hook

    # The class forward's signature and name, so inspect/diffusers' argument checks see the real thing.
    @property
    def __wrapped__(self) -> Any:
        return self.inner

    @property
    def __name__(self) -> str:  # noqa: D401
        return getattr(self.inner, "__name__", "forward")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        site = self.site
        if site is None:
            if not torch.compiler.is_compiling() and self.module.__dict__.get("forward") is self:
                self.remove()  # the layer that wrapped this inert hook is gone: step out too
            return self.inner(*args, **kwargs)
        if not torch.compiler.is_compiling():
            res = site.pre(args, kwargs)  # eager: no need for the disable wrapper's frame switch
            if res is CALL:
                return site.post(args, kwargs, self.inner(*args, **kwargs))
            if type(res) is CallWith:
                return site.post(args, kwargs, self.inner(*res.args, **res.kwargs))
            return res
        if getattr(self.owner, "idle", False):
            return self.inner(*args, **kwargs)
        res = _pre(site, args, kwargs)
        if res is CALL:
            return _post(site, args, kwargs, self.inner(*args, **kwargs))
        if type(res) is CallWith:
            return _post(site, args, kwargs, self.inner(*res.args, **res.kwargs))
        return res

    # -- removal ---------------------------------------------------------------------------------
    def remove(self) -> None:
        """Take this hook out; if something wrapped it since, leave it in place as a pass-through."""
        self.site = None
        self.owner = None
        d = self.module.__dict__
        if d.get(_ATTR) is self:
            del d[_ATTR]
        if d.get("forward") is self:
            del d["forward"]
            if self.saved is not _MISSING:
                d["forward"] = self.saved

    # -- copies ----------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> "Hook":
        import copy

        module = copy.deepcopy(self.module, memo)
        return _inert(module, copy.deepcopy(self.saved, memo) if self.saved is not _MISSING else _MISSING)

    def __reduce__(self) -> tuple:
        return (_inert, (self.module, self.saved if self.saved is not _MISSING else None))


def _inert(module: torch.nn.Module, saved: Any) -> Hook:
    """A pass-through hook on a copied/unpickled module: calls the copy's own forward."""
    hook = Hook.__new__(Hook)
    hook.module, hook.site, hook.owner = module, None, None
    hook.saved = _MISSING if saved is None or saved is _MISSING else saved
    hook.inner = _Bound(module, hook.saved)
    return hook


class _Bound:
    """Late-bound forward of a copied module (its ``__dict__`` may not be filled yet when built)."""

    def __init__(self, module: torch.nn.Module, saved: Any) -> None:
        self.module, self.saved = module, saved

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.saved is not _MISSING:
            return self.saved(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


def install(module: torch.nn.Module, site: Site, owner: Any = None) -> Hook:
    """Wrap ``module.forward`` with a :class:`Hook` running ``site``. One live dcache hook per module."""
    live = module.__dict__.get(_ATTR)
    if live is not None and live.site is not None:
        raise RuntimeError(f"{type(module).__name__} already carries a dcache hook; call dcache.disable first")
    hook = Hook(module, site, owner)
    module.__dict__[_ATTR] = hook
    module.__dict__["forward"] = hook
    return hook


def is_hooked(module: torch.nn.Module) -> bool:
    hook = module.__dict__.get(_ATTR)
    return hook is not None and hook.site is not None


def strip_inert(module: torch.nn.Module) -> None:
    """Remove inert hooks left on a copied module (``dcache.disable`` on a copy)."""
    d = module.__dict__
    fwd = d.get("forward")
    while isinstance(fwd, Hook) and fwd.site is None:
        del d["forward"]
        if fwd.saved is not _MISSING:
            d["forward"] = fwd.saved
        fwd = d.get("forward")
    hook = d.get(_ATTR)
    if isinstance(hook, Hook) and hook.site is None:
        del d[_ATTR]
