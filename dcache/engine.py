"""Installing and removing dcache on a diffusers pipeline or a bare denoiser.

``install`` finds the denoiser, picks its adapter, builds the policies and puts hooks on the
instances: the denoiser's forward (one Step per call), the blocks or module sites the policies
act on, and the pipeline's ``__call__`` (one Run per generation, closed in ``finally``). Nothing
is patched on a class. ``uninstall`` undoes every patch exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from dcache import flops as flops_mod
from dcache.hooks import patch_forward, restore_forward
from dcache.run import Run
from dcache.schedulers._base import ModulePolicy, PolicyEnv, StepPolicy

logger = logging.getLogger("dcache")

_DENOISER_ATTRS = ("transformer", "unet")


class Handle:
    """``pipe.dcache``: stats and reset for the accelerated object."""

    def __init__(self, owner: Any, denoiser: torch.nn.Module, adapter: Any, configs: list, policies: list) -> None:
        self.owner = owner
        self.denoiser = denoiser
        self.adapter = adapter
        self.configs = configs
        self.policies = policies
        self.run: Run | None = None
        self.pipeline_run = False
        self.scheduler = getattr(owner, "scheduler", None) if owner is not denoiser else None
        self._last_stats: dict[str, Any] = {}
        # Shared by every handle on this denoiser: re-accelerating must not measure FLOPs again.
        self._flop_tables = flops_mod.tables_for(denoiser)
        self.patched: list[torch.nn.Module] = []
        self.root_name = type(denoiser).__name__
        self.module_names = {m: f"{self.root_name}.{n}" if n else self.root_name for n, m in denoiser.named_modules()}

    # -- runs ------------------------------------------------------------------------------------
    def begin_run(self, num_steps: int | None) -> None:
        self.end_run()
        self.run = Run(num_steps)
        self.pipeline_run = True

    def end_run(self) -> None:
        if self.run is not None:
            for p in self.policies:
                p.on_run_end()
            self.run.close()
            self._last_stats = self._stats_of(self.run)
        self.run = None
        self.pipeline_run = False

    @torch.compiler.disable
    def run_for_call(self, timestep: float) -> Run:
        run = self.run
        if run is None:
            run = self.run = Run(None)
        elif not self.pipeline_run and run.looks_like_new_trajectory(timestep):
            self.end_run()
            run = self.run = Run(None)
        if run.num_steps is None and run.step_index < 0 and self.scheduler is not None:
            ts = getattr(self.scheduler, "timesteps", None)
            if ts is not None and len(ts) > 0:
                run.num_steps = len(ts)
        return run

    def active(self) -> tuple[Run, Any] | tuple[None, None]:
        """(run, step) while a denoiser call is in progress, else (None, None)."""
        run = self.run
        if run is None or run.current is None:
            return None, None
        return run, run.current

    def flops_for(self, args: tuple, kwargs: dict) -> flops_mod.FlopTable | None:
        return self._flop_tables.get(flops_mod.signature(args, kwargs))

    def store_flops(self, args: tuple, kwargs: dict, table: flops_mod.FlopTable) -> None:
        self._flop_tables[flops_mod.signature(args, kwargs)] = table

    # -- public ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop every cached tensor and start the next call as a new generation."""
        self.end_run()

    def _stats_of(self, run: Run) -> dict[str, Any]:
        s = run.stats()
        s["policies"] = [type(c).policy_name for c in self.configs]
        s["model"] = self.root_name
        return s

    def stats(self) -> dict[str, Any]:
        """Stats of the generation in progress, or of the last one finished."""
        if self.run is not None:
            return self._stats_of(self.run)
        return dict(self._last_stats)

    def __repr__(self) -> str:
        return f"<dcache {', '.join(type(c).policy_name for c in self.configs)} on {self.root_name}>"


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


def _parallel_group(denoiser: torch.nn.Module) -> Any:
    """The process group sharding this denoiser's sequence, when diffusers' parallelism is on."""
    if getattr(denoiser, "_parallel_config", None) is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    logger.info("dcache: context parallelism detected; skip decisions are all-reduced across ranks")
    return dist.group.WORLD


def install(obj: Any, configs: list) -> Any:
    from dcache.pipelines.adapters import get_adapter
    from dcache.module_cache import install_module_hooks
    from dcache.step_cache import install_step_hooks

    if getattr(obj, "dcache", None) is not None and isinstance(obj.__dict__.get("dcache"), Handle):
        logger.info("dcache: replacing the policy already installed on %s", type(obj).__name__)
        uninstall(obj)
    denoiser, is_pipeline = find_denoiser(obj)
    adapter = get_adapter(denoiser)
    blocks = adapter.blocks(denoiser) if adapter.has_blocks else []
    if adapter.has_blocks and not blocks:
        raise ValueError(f"{type(denoiser).__name__} has no transformer blocks in {adapter.block_lists}; nothing to cache")
    coeffs, source = adapter.coefficients_for(denoiser)
    env = PolicyEnv(
        family=adapter.family,
        num_blocks=len(blocks),
        has_blocks=adapter.has_blocks,
        teacache_coefficients=coeffs,
        coefficients_source=source,
        model_id=str(getattr(getattr(denoiser, "config", None), "_name_or_path", "") or type(denoiser).__name__),
    )
    env.parallel_group = _parallel_group(denoiser)
    policies = [c.build(env) for c in configs]
    for p in policies:
        p.group = env.parallel_group
    handle = Handle(obj, denoiser, adapter, configs, policies)
    try:
        step_policies = [p for p in policies if isinstance(p, StepPolicy)]
        module_policies = [p for p in policies if isinstance(p, ModulePolicy)]
        whole_model = None
        for p in step_policies:
            if adapter.has_blocks:
                install_step_hooks(handle, p, blocks)
            else:
                whole_model = p
        hooked = 0
        for p in module_policies:
            hooked += install_module_hooks(handle, p, blocks)
            if hooked == 0:
                raise ValueError(f"{type(p).__name__}: no module sites found in {type(denoiser).__name__}'s blocks")
        _install_denoiser_hook(handle, whole_model)
        if is_pipeline:
            _install_pipeline_hook(obj, handle)
        obj.__dict__["dcache"] = handle
        denoiser.__dict__["_dcache_handle"] = handle
    except BaseException:
        _remove_hooks(obj, handle)
        raise
    return obj


def uninstall(obj: Any) -> Any:
    handle = obj.__dict__.get("dcache") if hasattr(obj, "__dict__") else None
    if not isinstance(handle, Handle):
        return obj
    _remove_hooks(obj, handle)
    return obj


def _remove_hooks(obj: Any, handle: Handle) -> None:
    handle.end_run()
    for m in handle.patched:
        restore_forward(m)
    handle.patched.clear()
    cls = type(obj)
    if getattr(cls, "_dcache_wrapped", False):
        obj.__class__ = cls.__bases__[0]
    obj.__dict__.pop("dcache", None)
    handle.denoiser.__dict__.pop("_dcache_handle", None)


def patch(handle: Handle, module: torch.nn.Module, make: Any) -> None:
    patch_forward(module, make)
    handle.patched.append(module)


def patch_step_hook(handle: Handle, module: torch.nn.Module, body: Any) -> None:
    """Patch ``module`` so that during a denoiser call ``body(run, step, original, args, kwargs)``
    runs instead of its forward; outside one (a call the engine did not open) it runs unchanged."""

    def make(original):
        @torch.compiler.disable
        def forward(*args: Any, **kwargs: Any) -> Any:
            run, step = handle.active()
            if step is None:
                return original(*args, **kwargs)
            return body(run, step, original, args, kwargs)

        return forward

    patch(handle, module, make)


# ---------------------------------------------------------------------------------------------
# the denoiser hook: one Step per call
# ---------------------------------------------------------------------------------------------
def _install_denoiser_hook(handle: Handle, whole_model: StepPolicy | None) -> None:
    denoiser, adapter = handle.denoiser, handle.adapter

    def make(original):
        def inner(args: tuple, kwargs: dict) -> Any:
            if whole_model is None:
                return original(*args, **kwargs)
            return _whole_model_step(handle, whole_model, original, args, kwargs)

        def forward(*args: Any, **kwargs: Any) -> Any:
            t = adapter.timestep(denoiser, args, kwargs)
            run = handle.run_for_call(t)
            run.next_call(t)
            table = handle.flops_for(args, kwargs)
            if table is None:
                out, table = flops_mod.measure(lambda: inner(args, kwargs), denoiser, handle.module_names)
                handle.store_flops(args, kwargs, table)
            else:
                out = inner(args, kwargs)
            run.flops_total += table.total
            run.flops_avoided += run.pending_avoided(table)
            run.note_cache_size()
            return out

        return forward

    patch(handle, denoiser, make)


def _whole_model_step(handle: Handle, policy: StepPolicy, original: Any, args: tuple, kwargs: dict) -> Any:
    """Step-level caching of a model without a block chain (UNets): reuse its last output."""
    run = handle.run
    step = run.current
    pid = id(policy)
    state = run.state((pid, "state", step.branch), policy.new_state)
    signal = handle.adapter.model_probe(handle.denoiser, args, kwargs) if policy.needs_probe else None
    compute = policy.decide(state, step, signal)
    key = (pid, "output", step.branch)
    cached = run.cache.get(key)
    if not compute and cached is not None:
        run.count("reused", "model")
        run.avoid(handle.root_name)
        return _with_sample(cached[1], cached[0])
    out = original(*args, **kwargs)
    sample = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
    run.cache[key] = (sample, out)
    run.count("computed", "model")
    return out


def _with_sample(template: Any, sample: torch.Tensor) -> Any:
    if isinstance(template, tuple):
        return (sample,) + tuple(template[1:])
    if isinstance(template, torch.Tensor):
        return sample
    return type(template)(sample=sample)


# ---------------------------------------------------------------------------------------------
# the pipeline hook: one Run per call
# ---------------------------------------------------------------------------------------------
def _install_pipeline_hook(pipe: Any, handle: Handle) -> None:
    base = type(pipe)
    original_call = base.__call__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        h = self.__dict__.get("dcache")
        if h is None:
            return original_call(self, *args, **kwargs)
        steps = kwargs.get("num_inference_steps")
        if kwargs.get("sigmas") is not None:
            steps = len(kwargs["sigmas"])
        elif kwargs.get("timesteps") is not None:
            steps = len(kwargs["timesteps"])
        # Without an explicit count, the scheduler's timesteps give it at the first denoiser call.
        h.begin_run(steps)
        try:
            return original_call(self, *args, **kwargs)
        finally:
            h.end_run()

    # Same name and module as the original so diffusers' class-name checks and save_pretrained
    # see the pipeline they expect; restored by assigning the base class back.
    sub = type(base.__name__, (base,), {"__call__": __call__, "_dcache_wrapped": True, "__module__": base.__module__})
    sub.__qualname__ = base.__qualname__
    pipe.__class__ = sub
