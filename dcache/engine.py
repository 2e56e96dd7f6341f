"""Installing and removing dcache on a diffusers pipeline or a bare denoiser.

``install`` finds the denoiser(s), picks each one's adapter, builds the policies, and hands each
policy to the installer of its granularity (``dcache.installers``), which hooks what it needs and
returns how many sites it hooked. On top it hooks the denoiser's forward (one Step per call) and
the pipeline's ``__call__`` (one Run per generation, closed in ``finally``), and counts the
pipeline scheduler's ``step()`` calls during a generation: that is the loop's step index.
Nothing is patched on a class. ``uninstall`` removes dcache's layer alone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from dcache import flops as flops_mod
from dcache import installers, wrapper
from dcache.handle import DetachedHandle, Handle, Target
from dcache.schedulers._common import PolicyEnv

logger = logging.getLogger("dcache")

_DENOISER_ATTRS = ("transformer", "unet")
_SECOND_EXPERTS = ("transformer_2",)


def find_denoiser(obj: Any) -> tuple[torch.nn.Module, bool]:
    """(denoiser, is_pipeline)."""
    if isinstance(obj, torch.nn.Module):
        return obj, False
    for attr in _DENOISER_ATTRS:
        m = getattr(obj, attr, None)
        if isinstance(m, torch.nn.Module):
            return m, True
    raise ValueError(
        f"expected a diffusers pipeline (with .transformer or .unet) or a denoiser nn.Module, got {type(obj).__name__}"
    )


def _denoisers(obj: Any) -> list[tuple[str, torch.nn.Module]]:
    first, is_pipeline = find_denoiser(obj)
    out = [("transformer" if getattr(obj, "transformer", None) is first else "unet", first)] if is_pipeline \
        else [(type(first).__name__, first)]
    if is_pipeline:
        for attr in _SECOND_EXPERTS:
            m = getattr(obj, attr, None)
            if isinstance(m, torch.nn.Module) and m is not first:
                out.append((attr, m))
    return out


def _parallel_group(denoiser: torch.nn.Module) -> Any:
    """The process group sharding this denoiser's sequence, when diffusers' parallelism is on."""
    cfg = getattr(denoiser, "_parallel_config", None)
    if cfg is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    cp = getattr(cfg, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None) if cp is not None else None
    group = None
    if mesh is not None:
        try:
            group = mesh.get_group()
        except Exception:  # noqa: BLE001 - a mesh without a single flattened group
            group = None
    if group is None:
        logger.warning("dcache: context parallelism detected but its group is not readable; using the world group")
        group = dist.group.WORLD
    logger.info("dcache: context parallelism detected; skip decisions are reduced over its group")
    return group


def _check_no_diffusers_cache(denoiser: torch.nn.Module) -> None:
    if getattr(denoiser, "is_cache_enabled", False):
        cfg = getattr(denoiser, "_cache_config", None)
        raise ValueError(
            f"{type(denoiser).__name__} already has diffusers' own cache enabled ({type(cfg).__name__}); "
            "call its disable_cache() before dcache.accelerate, one cache per denoiser"
        )


def _env(adapter: Any, denoiser: torch.nn.Module, blocks: list) -> PolicyEnv:
    coeffs, source = adapter.coefficients_for(denoiser)
    return PolicyEnv(
        family=adapter.family,
        num_blocks=len(blocks),
        has_blocks=adapter.has_blocks,
        teacache_coefficients=coeffs,
        coefficients_source=source,
        model_id=str(getattr(getattr(denoiser, "config", None), "_name_or_path", "") or type(denoiser).__name__),
        parallel_group=_parallel_group(denoiser),
        teacache_warmup_steps=adapter.teacache_warmup_for(denoiser),
        attention_kinds=tuple(sorted(adapter.attention_kinds(blocks))) if adapter.has_blocks else (),
        guidance_distilled=adapter.guidance_distilled(denoiser),
        model_class=type(denoiser).__name__,
        config_hash=_config_hash(denoiser),
    )


def _config_hash(denoiser: torch.nn.Module) -> str:
    """sha256 of the denoiser's public config (keys without a leading '_'), 16 hex digits."""
    import hashlib
    import json

    config = getattr(denoiser, "config", None) or {}
    public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:16]


def install(obj: Any, configs: list) -> Any:
    from dcache.pipelines.adapters import get_adapter

    if isinstance(getattr(obj, "__dict__", {}).get("dcache"), Handle):
        logger.info("dcache: replacing the policy already installed on %s", type(obj).__name__)
        uninstall(obj)
    elif isinstance(getattr(obj, "__dict__", {}).get("dcache"), DetachedHandle):
        uninstall(obj)
    denoisers = _denoisers(obj)
    is_pipeline = not isinstance(obj, torch.nn.Module)
    handle = Handle(obj, configs)
    handle.idle = all(type(c).policy_name == "none" for c in configs)
    handle.scheduler = getattr(obj, "scheduler", None) if is_pipeline else None
    names = [type(c).policy_name for c in configs]
    try:
        for index, (attr, denoiser) in enumerate(denoisers):
            _check_no_diffusers_cache(denoiser)
            adapter = get_adapter(denoiser)
            target = Target(handle, denoiser, adapter, attr, index)
            if adapter.has_blocks and not target.blocks:
                raise ValueError(
                    f"{type(denoiser).__name__} has no transformer blocks in {adapter.block_lists}; nothing to cache")
            env = _env(adapter, denoiser, target.blocks)
            target.parallel_config = getattr(denoiser, "_parallel_config", None)
            handle.targets.append(target)
            for config in configs:
                policy = config.build(env)
                policy.group = env.parallel_group
                target.policies.append(policy)
                gran = getattr(policy, "granularity", None) or getattr(type(config), "granularity", None)
                fn = installers.installer_for(gran)
                if fn is None:
                    raise ValueError(
                        f"policy {type(config).policy_name!r} has granularity {gran!r}, which no installer handles; "
                        f"known: {', '.join(installers.granularities())} (see docs/engine.md)")
                hooked = fn(target, policy)
                if not hooked:
                    raise ValueError(
                        f"policy {type(config).policy_name!r} hooked 0 sites on {type(denoiser).__name__} "
                        f"(granularity {gran!r}); nothing would be cached")
            _hook_denoiser(target, denoiser)
            denoiser.__dict__["_dcache_handle"] = handle
        if is_pipeline:
            _install_pipeline_hook(obj, handle)
        obj.__dict__["dcache"] = handle
    except BaseException:
        _remove_hooks(obj, handle)
        raise
    logger.debug("dcache: %s installed on %s", names, [t.root_name for t in handle.targets])
    return obj


def uninstall(obj: Any) -> Any:
    d = getattr(obj, "__dict__", {})
    handle = d.get("dcache")
    if isinstance(handle, DetachedHandle):
        handle.detach()
        d.pop("dcache", None)
        for m in (obj.modules() if isinstance(obj, torch.nn.Module) else []):
            m.__dict__.pop("_dcache_handle", None)
        return obj
    if not isinstance(handle, Handle):
        return obj
    _remove_hooks(obj, handle)
    return obj


def _remove_hooks(obj: Any, handle: Handle) -> None:
    handle.end_run()
    for t in handle.targets:
        for h in reversed(t.hooks):
            h.remove()
        t.hooks.clear()
        t.denoiser.__dict__.pop("_dcache_handle", None)
    for undo in reversed(handle.extra_patches):
        undo()
    handle.extra_patches.clear()
    obj.__dict__.pop("dcache", None)


# ---------------------------------------------------------------------------------------------
# the denoiser hook: one Step per call
# ---------------------------------------------------------------------------------------------
class _DenoiserSite:
    """Opens the Step of a denoiser call, runs the interceptors, and prices the call in FLOPs."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.measure_next = False

    def pre(self, args: tuple, kwargs: dict, compiling: bool = False) -> Any:
        t = self.target
        h = t.handle
        if h.calling is not None and h.run is not None:
            h.run.end_call()  # the previous call raised before finishing: close it
        cfg = getattr(t.denoiser, "_parallel_config", None)
        if cfg is not t.parallel_config:
            # Parallelism enabled (or changed) after accelerate: take its group now, so data-dependent
            # decisions are reduced over the ranks that shard this denoiser's sequence.
            t.parallel_config = cfg
            group = _parallel_group(t.denoiser)
            for p in t.policies:
                p.group = group
        ts = t.adapter.timestep(t.denoiser, args, kwargs)
        run = h.run_for_call(ts)
        step = run.next_call(ts)
        h.calling = t
        self.table = t.flop_tables.get(flops_mod.signature(args, kwargs))
        self.measure_next = self.table is None and not compiling
        for ic in t.interceptors:
            res = ic.intercept(run, step, args, kwargs)
            if res is not wrapper.CALL:
                self.measure_next = False
                self._close(run, step)
                return res
        return wrapper.CALL

    def post(self, args: tuple, kwargs: dict, out: Any) -> Any:
        t = self.target
        run, step = t.active()
        if step is None:
            return out
        for ic in t.interceptors:
            out = ic.after(run, step, args, kwargs, out)
        self._close(run, step)
        return out

    def _close(self, run: Any, step: Any) -> None:
        for fn in self.target.end_call:
            fn(run, step)
        table = self.table
        if table is None:
            run.flops_measured = False
        else:
            run.flops_total += table.total
        run.flops_avoided += run.pending_avoided(table)
        run.note_cache_size()
        run.end_call()
        self.target.handle.calling = None

    def abort(self) -> None:
        h = self.target.handle
        if h.run is not None:
            h.run.end_call()
        h.calling = None


@torch.compiler.disable(reason=wrapper.REASON)
def _denoiser_pre(site: _DenoiserSite, args: tuple, kwargs: dict, compiling: bool) -> Any:
    return site.pre(args, kwargs, compiling)


@torch.compiler.disable(reason=wrapper.REASON)
def _measured_call(site: _DenoiserSite, inner: Any, args: tuple, kwargs: dict) -> Any:
    """The first call of an input signature runs under the FLOP counter, with compiled regions
    forced eager, so measuring never happens inside (or leaves guards on) a compiled frame."""
    t = site.target
    with torch.compiler.set_stance("force_eager"):
        out, table = flops_mod.measure(lambda: inner(*args, **kwargs), t.denoiser, t.names)
    t.flop_tables[flops_mod.signature(args, kwargs)] = table
    site.table = table
    return out


class _DenoiserHook(wrapper.Hook):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        site = self.site
        if site is None:
            return super().__call__(*args, **kwargs)
        compiling = torch.compiler.is_compiling()
        if compiling and getattr(self.owner, "idle", False):
            return self.inner(*args, **kwargs)
        res = _denoiser_pre(site, args, kwargs, compiling)
        if res is not wrapper.CALL:
            return res
        if site.measure_next:
            out = _measured_call(site, self.inner, args, kwargs)
        else:
            out = self.inner(*args, **kwargs)
        return wrapper._post(site, args, kwargs, out)


def _hook_denoiser(target: Target, denoiser: torch.nn.Module) -> None:
    site = _DenoiserSite(target)
    if wrapper.is_hooked(denoiser):
        raise RuntimeError(f"{type(denoiser).__name__} already carries a dcache hook; call dcache.disable first")
    hook = _DenoiserHook(denoiser, site, target.handle)
    denoiser.__dict__[wrapper._ATTR] = hook
    denoiser.__dict__["forward"] = hook
    target.hooks.append(hook)


# ---------------------------------------------------------------------------------------------
# the pipeline hook: one Run per call, the loop's steps from scheduler.step()
# ---------------------------------------------------------------------------------------------
def _install_pipeline_hook(pipe: Any, handle: Handle) -> None:
    base = type(pipe)
    original_call = base.__call__

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        h = self.__dict__.get("dcache")
        if not isinstance(h, Handle):
            return original_call(self, *args, **kwargs)
        h.scheduler = getattr(self, "scheduler", None)
        h.begin_run(None)
        undo = _count_scheduler_steps(h)
        try:
            return original_call(self, *args, **kwargs)
        finally:
            undo()
            h.end_run()

    # Same name and module as the original so diffusers' class-name checks and save_pretrained
    # see the pipeline they expect; restored by assigning the base class back.
    sub = type(base.__name__, (base,), {"__call__": __call__, "_dcache_wrapped": True, "__module__": base.__module__})
    sub.__qualname__ = base.__qualname__
    pipe.__class__ = sub

    def restore() -> None:
        if type(pipe) is sub:
            pipe.__class__ = base

    handle.extra_patches.append(restore)


def _count_scheduler_steps(handle: Handle) -> Any:
    sched = handle.scheduler
    if sched is None or not callable(getattr(sched, "step", None)):
        if handle.run is not None:
            handle.run.loop = False
        return lambda: None
    saved = sched.__dict__.get("step", wrapper._MISSING)
    inner = sched.step

    def step(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        if handle.run is not None:
            handle.run.scheduler_stepped()
        return out

    sched.__dict__["step"] = step

    def undo() -> None:
        if sched.__dict__.get("step") is step:
            del sched.__dict__["step"]
            if saved is not wrapper._MISSING:
                sched.__dict__["step"] = saved

    return undo
