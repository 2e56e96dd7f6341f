"""Per-generation bookkeeping: one Run per pipeline call, one Step per denoiser call.

Everything cached lives in ``Run.cache`` and dies with the Run, so nothing leaks from one
generation to the next and memory returns to its baseline when the Run is closed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Step:
    """One denoiser call: its step index, timestep and guidance branch."""

    index: int
    branch: int
    timestep: float
    num_steps: int | None
    # Per-policy decisions taken once per (step, branch) and shared by every site.
    decisions: dict[int, Any] = field(default_factory=dict)

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
    """State of one generation. ``num_steps`` is known when a pipeline call opened the Run."""

    def __init__(self, num_steps: int | None = None) -> None:
        self.num_steps = num_steps
        self.step_index = -1
        self.branch = 0
        self._last_t: float | None = None
        self.current: Step | None = None
        # (owner id, key, branch) -> cached object; dropped wholesale when the Run closes.
        self.cache: dict[tuple, Any] = {}
        self.calls = 0
        self.counts = {"computed": 0, "reused": 0, "forecast": 0}
        self.site_counts: dict[str, dict[str, int]] = {}
        self.flops_total = 0.0
        self.flops_avoided = 0.0
        self.peak_cache_bytes = 0
        self._avoided: list[str] = []
        # One entry per denoiser call: what each site did (the demo's per-step timeline).
        self.timeline: list[dict[str, Any]] = []

    # -- steps ---------------------------------------------------------------------------------
    def next_call(self, timestep: float) -> Step:
        """Classify a denoiser call: a new timestep starts a step, a repeat is the next branch."""
        if self._last_t is not None and timestep == self._last_t:
            self.branch += 1
        else:
            self.step_index += 1
            self.branch = 0
            self._last_t = timestep
        self.calls += 1
        self.current = Step(self.step_index, self.branch, timestep, self.num_steps)
        self.timeline.append({"step": self.step_index, "branch": self.branch, "timestep": float(timestep), "sites": {}})
        return self.current

    def looks_like_new_trajectory(self, timestep: float, decreasing: bool = True) -> bool:
        """A bare model has no pipeline call around it: a timestep that goes back up means a new run."""
        if self._last_t is None:
            return False
        if self.num_steps is not None and self.step_index >= self.num_steps - 1 and timestep != self._last_t:
            return True
        return timestep > self._last_t if decreasing else timestep < self._last_t

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

    def avoid(self, module_name: str) -> None:
        """Record that ``module_name`` was skipped in the current call (priced when the call ends)."""
        self._avoided.append(module_name)

    def pending_avoided(self, table) -> float:
        total = sum(table.of(n) for n in self._avoided)
        self._avoided.clear()
        return total

    def cache_bytes(self) -> int:
        return sum(tensor_bytes(v) for v in self.cache.values())

    def note_cache_size(self) -> None:
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())

    def close(self) -> None:
        self.cache.clear()
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
            "flops_avoided_fraction": frac,
            "estimated_speedup": 1.0 / (1.0 - frac) if frac < 1 else float("inf"),
            "peak_cache_bytes": self.peak_cache_bytes,
            "cache_bytes": self.cache_bytes(),
            # [{"step", "branch", "timestep", "sites": {site: "computed"|"reused"|"forecast"}}, ...]
            "timeline": [dict(e, sites=dict(e["sites"])) for e in self.timeline],
        }
