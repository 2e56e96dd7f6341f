"""Per-generation bookkeeping: one Run per generation, one Step per denoiser call.

The step index comes from the denoising loop, not from comparing timesteps: inside a pipeline
call the engine counts the scheduler's ``step()`` calls (grouped by the scheduler's ``order``, so
Heun's predictor/corrector pair at a repeated timestep is one step), and the calls of the
denoiser since the last ``step()`` are the guidance branches. The number of steps is the
pipeline's own loop length (``_num_timesteps``, set after ``strength``/``denoising_end`` have cut
the schedule). Only a bare model outside any pipeline, or a pipeline whose loop never calls
``scheduler.step()`` (its own solver: a new timestep arrives before any ``step()``), falls back
to the timestep sequence.

Everything cached lives in ``Run.cache`` and dies with the Run, so nothing leaks from one
generation to the next and memory returns to its baseline when the Run is closed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Step:
    """One denoiser call: its loop step, guidance branch, timestep and sub-call within the step."""

    index: int
    branch: int
    timestep: float
    num_steps: int | None
    sub: int = 0  # 0, then 1 for the corrector call of a second-order scheduler at the same step
    # Per-policy decisions taken once per (step, branch) and shared by every site and sub-call.
    decisions: dict[Any, Any] = field(default_factory=dict)

    @property
    def is_last(self) -> bool:
        return self.num_steps is not None and self.index >= self.num_steps - 1


def tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    # State objects (Taylor terms, reference residuals) report their own tensors.
    return value.cache_nbytes() if hasattr(value, "cache_nbytes") else 0


class Run:
    """State of one generation.

    ``loop`` is True when a pipeline call opened the Run and reports scheduler steps through
    :meth:`scheduler_stepped`; otherwise (a bare model) steps are inferred from the timesteps.
    """

    def __init__(self, num_steps: int | None = None, loop: bool = False, order: int = 1) -> None:
        self.num_steps = num_steps
        self.loop = loop
        self.order = max(int(order), 1)
        self.step_index = -1
        self.branch = 0
        self.sub_steps = 0  # scheduler.step() calls so far
        self._calls_since_step = 0
        self._last_t: float | None = None
        self._direction = 0  # bare models: +1 increasing timesteps, -1 decreasing, 0 unknown
        self.current: Step | None = None
        self._steps: dict[tuple[int, int], Step] = {}
        # (owner id, key, branch) -> cached object; dropped wholesale when the Run closes.
        self.cache: dict[tuple, Any] = {}
        self.calls = 0
        self.counts = {"computed": 0, "reused": 0, "forecast": 0}
        self.site_counts: dict[str, dict[str, int]] = {}
        # Token-subset sites: site -> [tokens that went through the module, tokens it was called on].
        self.tokens: dict[str, list[int]] = {}
        self.flops_total = 0.0
        self.flops_avoided = 0.0
        self.flops_measured = True
        self.peak_cache_bytes = 0
        self._avoided: list[tuple[str, float]] = []
        # One entry per denoiser call: what each site did (the demo's per-step timeline).
        self.timeline: list[dict[str, Any]] = []

    # -- steps ---------------------------------------------------------------------------------
    def scheduler_stepped(self) -> None:
        """The pipeline's loop called ``scheduler.step()``: the next denoiser call is a new sub-step."""
        self.sub_steps += 1
        self._calls_since_step = 0

    def _loop_step(self) -> tuple[int, int]:
        """(step, sub) of the current sub-step: second-order schedulers pair (1,2), (3,4), ... ."""
        i = self.sub_steps
        if self.order == 1:
            return i, 0
        return (i + self.order - 1) // self.order, (i + self.order - 1) % self.order

    def next_call(self, timestep: float) -> Step:
        """Open the Step of a denoiser call."""
        if self.loop and self.sub_steps == 0 and self._calls_since_step and timestep != self._last_t:
            # A new timestep before any scheduler.step(): this loop updates the latents itself
            # (its own solver). From here on its steps are the timestep changes, as for a bare model.
            self.loop = False
        if self.loop:
            index, sub = self._loop_step()
            branch = self._calls_since_step
            self._calls_since_step += 1
            if self.sub_steps == 0 and branch == 0:
                self._last_t = timestep  # what the first step's later calls are compared with
        else:
            index, sub, branch = self._bare_step(timestep)
        self.step_index = max(self.step_index, index)
        self.branch = branch
        self.calls += 1
        # One Step object per (step, branch): a corrector call shares its decisions.
        key = (index, branch)
        step = self._steps.get(key)
        if step is None or sub == 0:
            step = self._steps[key] = Step(index, branch, timestep, self.num_steps, sub)
        else:
            step.sub, step.timestep = sub, timestep
        self.current = step
        self.timeline.append({"step": index, "branch": branch, "timestep": float(timestep), "sites": {}})
        return step

    def _bare_step(self, timestep: float) -> tuple[int, int, int]:
        if self._last_t is not None and timestep == self._last_t:
            self.branch += 1
        else:
            if self._last_t is not None and self._direction == 0:
                self._direction = 1 if timestep > self._last_t else -1
            self.step_index += 1
            self.branch = 0
            self._last_t = timestep
        return self.step_index, 0, self.branch

    def end_call(self) -> None:
        self.current = None

    def looks_like_new_trajectory(self, timestep: float) -> bool:
        """A bare model has no loop around it: a timestep that turns against the run's direction
        (or any change after the known last step) starts a new generation."""
        if self.loop or self._last_t is None or timestep == self._last_t:
            return False
        if self.num_steps is not None and self.step_index >= self.num_steps - 1:
            return True
        if self._direction == 0:
            return False
        return (timestep - self._last_t) * self._direction < 0

    def state(self, key: tuple, factory: Any) -> Any:
        """The per-run object under ``key`` (policy state, chain state, site history), made on first use."""
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = factory()
        return value

    # -- accounting ----------------------------------------------------------------------------
    def count(self, kind: str, site: str | None = None, n: int = 1) -> None:
        self.counts[kind] += n
        if site is not None and self.timeline:
            self.timeline[-1]["sites"][site] = kind
        if site is not None:
            d = self.site_counts.setdefault(site, {"computed": 0, "reused": 0, "forecast": 0})
            d[kind] += n

    def count_tokens(self, site: str, computed: int, total: int) -> None:
        """A token-subset site ran ``computed`` of the ``total`` tokens (batch rows included) it was given."""
        t = self.tokens.setdefault(site, [0, 0])
        t[0] += computed
        t[1] += total

    def avoid(self, module_name: str, fraction: float = 1.0) -> None:
        """Record that ``module_name`` was skipped in the current call (or ``fraction`` of its
        batch rows were); priced when the call ends."""
        self._avoided.append((module_name, fraction))

    def pending_avoided(self, table: Any) -> float:
        total = sum(table.of(n) * f for n, f in self._avoided) if table is not None else 0.0
        self._avoided.clear()
        return total

    def cache_bytes(self) -> int:
        return sum(tensor_bytes(v) for v in self.cache.values())

    def note_cache_size(self) -> None:
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())

    def close(self) -> None:
        self.cache.clear()
        self._steps.clear()
        self.current = None

    def stats(self) -> dict[str, Any]:
        frac = self.flops_avoided / self.flops_total if self.flops_total > 0 else 0.0
        return {
            "steps": self.step_index + 1,
            "denoiser_calls": self.calls,
            "computed": self.counts["computed"],
            "reused": self.counts["reused"],
            "forecast": self.counts["forecast"],
            "sites": {k: dict(v) for k, v in self.site_counts.items()},
            # Token-subset sites only: {site: {"computed": tokens run, "total": tokens seen}}.
            "tokens": {k: {"computed": v[0], "total": v[1]} for k, v in self.tokens.items()},
            "flops_avoided_fraction": frac,
            "estimated_speedup": 1.0 / (1.0 - frac) if frac < 1 else float("inf"),
            "flops_measured": self.flops_measured,
            "peak_cache_bytes": self.peak_cache_bytes,
            "cache_bytes": self.cache_bytes(),
            # [{"step", "branch", "timestep", "sites": {site: "computed"|"reused"|"forecast"}}, ...]
            "timeline": [dict(e, sites=dict(e["sites"])) for e in self.timeline],
        }
