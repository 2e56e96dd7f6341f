"""``pipe.dcache``: the per-object handle, and one Target per hooked denoiser.

A pipeline can have two denoisers (Wan 2.2's ``transformer`` and ``transformer_2`` experts); each
is a :class:`Target` with its own adapter, policy instances (so its own cached state), FLOP
tables and hooks. Both share the handle's Run, because they share the denoising loop.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from dcache import flops as flops_mod
from dcache import wrapper
from dcache.run import Run, Step


class Target:
    """One hooked denoiser: what installers need to hook it and to reach the current step."""

    def __init__(self, handle: "Handle", denoiser: torch.nn.Module, adapter: Any, attr: str, index: int) -> None:
        self.handle = handle
        self.denoiser = denoiser
        self.adapter = adapter
        self.attr = attr
        self.blocks: list[torch.nn.Module] = adapter.blocks(denoiser) if adapter.has_blocks else []
        self.policies: list[Any] = []
        # Site names: the first denoiser keeps plain names, a second expert is prefixed.
        self.prefix = "" if index == 0 else f"{attr}:"
        self.root_name = type(denoiser).__name__ if index == 0 else attr
        self.names = {m: f"{self.root_name}.{n}" if n else self.root_name for n, m in denoiser.named_modules()}
        self.hooks: list[wrapper.Hook] = []
        # Denoiser-level interceptors (whole-model step caching, guidance): ``intercept`` / ``after``.
        self.interceptors: list[Any] = []
        # Called when a denoiser call ends (block chains finish a residual whose last block was skipped).
        self.end_call: list[Callable[[Run, Step], None]] = []
        self.flop_tables = flops_mod.tables_for(denoiser)
        self.parallel_config: Any = None  # the denoiser's diffusers parallel config seen last

    def hook(self, module: torch.nn.Module, site: Any) -> None:
        self.hooks.append(wrapper.install(module, site, self.handle))

    def active(self) -> tuple[Run, Step] | tuple[None, None]:
        """(run, step) while a call of this denoiser is in progress, else (None, None)."""
        run = self.handle.run
        if run is None or run.current is None or self.handle.calling is not self:
            return None, None
        return run, run.current


class Handle:
    """``pipe.dcache``: stats and reset for the accelerated object."""

    def __init__(self, owner: Any, configs: list) -> None:
        self.owner = owner
        self.configs = configs
        self.targets: list[Target] = []
        self.run: Run | None = None
        self.pipeline_run = False
        self.calling: Target | None = None  # the target whose denoiser call is in progress
        self.idle = False  # every policy is `none`: hooks pass through under torch.compile
        self.scheduler = None
        self._last_stats: dict[str, Any] = {}
        self.extra_patches: list[Callable[[], None]] = []  # undo functions (pipeline class swap)

    # backwards-compatible views of the first target
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.targets[0].denoiser

    @property
    def adapter(self) -> Any:
        return self.targets[0].adapter

    @property
    def policies(self) -> list[Any]:
        return self.targets[0].policies

    @property
    def root_name(self) -> str:
        return self.targets[0].root_name

    # -- runs ------------------------------------------------------------------------------------
    def begin_run(self, num_steps: int | None, loop: bool = True) -> None:
        self.end_run()
        order = getattr(self.scheduler, "order", 1) if self.scheduler is not None else 1
        self.run = Run(num_steps, loop=loop, order=order if isinstance(order, int) else 1)
        self.pipeline_run = True

    def end_run(self) -> None:
        if self.run is not None:
            for t in self.targets:
                for p in t.policies:
                    p.on_run_end()
            self.run.close()
            self._last_stats = self._stats_of(self.run)
        self.run = None
        self.pipeline_run = False
        self.calling = None

    def run_for_call(self, timestep: float) -> Run:
        run = self.run
        if run is None:
            run = self.run = Run(None)
        elif not self.pipeline_run and run.looks_like_new_trajectory(timestep):
            self.end_run()
            run = self.run = Run(None)
        if run.num_steps is None and run.calls == 0:
            run.num_steps = self._loop_length(run)
        return run

    def _loop_length(self, run: Run) -> int | None:
        """The pipeline's loop length: its ``_num_timesteps`` (after strength/denoising_end cut the
        schedule), else the scheduler's timesteps after its begin index; in steps of ``order``."""
        n = getattr(self.owner, "_num_timesteps", None) if self.pipeline_run else None
        sched = self.scheduler
        if not isinstance(n, int) and sched is not None:
            ts = getattr(sched, "timesteps", None)
            if ts is not None and len(ts) > 0:
                n = len(ts) - int(getattr(sched, "_begin_index", None) or 0)
        if not isinstance(n, int) or n <= 0:
            return None
        return (n + run.order - 1) // run.order

    # -- public ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop every cached tensor and start the next call as a new generation."""
        self.end_run()

    def _stats_of(self, run: Run) -> dict[str, Any]:
        s = run.stats()
        s["policies"] = [type(c).policy_name for c in self.configs]
        s["model"] = self.targets[0].root_name if self.targets else ""
        if len(self.targets) > 1:
            s["models"] = [t.attr for t in self.targets]
        return s

    def stats(self) -> dict[str, Any]:
        """Stats of the generation in progress, or of the last one finished."""
        if self.run is not None:
            return self._stats_of(self.run)
        return dict(self._last_stats)

    def __repr__(self) -> str:
        names = ", ".join(type(c).policy_name for c in self.configs)
        return f"<dcache {names} on {', '.join(t.root_name for t in self.targets)}>"

    # -- copies: a deep copy or an unpickled model carries inert hooks and a detached handle ----
    def __deepcopy__(self, memo: dict) -> "DetachedHandle":
        import copy

        return DetachedHandle([copy.deepcopy(h.module, memo) for t in self.targets for h in t.hooks])

    def __reduce__(self) -> tuple:
        return (DetachedHandle, ([h.module for t in self.targets for h in t.hooks],))


class DetachedHandle:
    """The ``dcache`` attribute of a copied or unpickled model: no caching, removable hooks."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.modules = modules

    def stats(self) -> dict[str, Any]:
        return {}

    def reset(self) -> None:
        pass

    def detach(self) -> None:
        for m in self.modules:
            wrapper.strip_inert(m)
        self.modules = []

    def __repr__(self) -> str:
        return "<dcache (detached copy: hooks inert; dcache.disable removes them)>"
