"""`magcache`: Magnitude-aware Cache (Zehong-Ma/MagCache, NeurIPS 2025, arXiv 2506.09045).

The residual of the whole block stack changes size by a nearly prompt-independent ratio
``gamma_t = mean_tokens(||r_t|| / ||r_(t-1)||)`` from step to step, while its direction barely moves.
From a per-checkpoint table of those ratios (calibrated once), each step after the warm-up
(``retention_ratio`` of the steps) multiplies ``gamma_t`` into the accumulated ratio and adds
``|1 - accumulated ratio|`` to the accumulated error; while that error stays at or below
``threshold`` and at most ``max_skip_steps`` steps in a row were skipped, the block chain is
skipped and its last residual reused, otherwise it is computed and the accumulators reset
(shared/reference/caching-algorithms.md, "MagCache"; diffusers' ``MagCacheConfig`` has the same
rule and defaults).

Ratio tables: the published ones (``schedulers/_magcache_tables.py``) are picked from the
checkpoint's name; other step counts are nearest-neighbour interpolated; tables that alternate
cond/uncond entries (Wan) are split into one table per branch, and each guidance branch keeps its
own accumulators. A model with no published table needs ``mag_ratios`` (a list, a table name, or
the JSON file that ``calibrate=True`` writes).

Example::

    pipe = dcache.accelerate(pipe, policy="magcache")                      # FLUX.1-dev, Wan 2.1, ...
    dcache.accelerate(pipe, policy="magcache", calibrate=True, calibration_file="mag.json")
    pipe(prompt)                                                           # one run computes every step
    dcache.accelerate(pipe, policy="magcache", mag_ratios="mag.json", threshold=0.12, max_skip_steps=4)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from dcache.registry import register_policy
from dcache.schedulers._base import PolicyEnv, PolicyState, StepPolicy
from dcache.schedulers._common import require_blocks
from dcache.schedulers._magcache_tables import FILE_TABLES, MATCH, TABLES
from dcache.schedulers._validate import check_bool, check_float, check_int

logger = logging.getLogger("dcache")


def nearest_resample(ratios: list[float], length: int) -> list[float]:
    """Nearest-neighbour resampling that keeps both ends: entry ``round(i * (n-1)/(length-1))``
    (round half to even, as diffusers' ``nearest_interp`` with ``torch.round``)."""
    n = len(ratios)
    if length == n:
        return list(ratios)
    if length == 1:
        return [ratios[-1]]
    scale = (n - 1) / (length - 1)
    return [ratios[min(round(i * scale), n - 1)] for i in range(length)]


class RatioTable:
    """One ratio list per guidance branch, each for ``steps`` steps; resampled on demand."""

    def __init__(self, branches: list[list[float]], source: str) -> None:
        self.branches = [list(map(float, b)) for b in branches]
        self.source = source
        self._resampled: dict[tuple[int, int], list[float]] = {}

    @classmethod
    def from_flat(cls, ratios: list[float], interleaved: bool, source: str) -> "RatioTable":
        if interleaved:
            if len(ratios) % 2:
                raise ValueError(f"magcache: an interleaved cond/uncond table needs an even length, got {len(ratios)}")
            return cls([ratios[0::2], ratios[1::2]], source)
        return cls([ratios], source)

    def for_branch(self, branch: int, num_steps: int | None) -> list[float]:
        # A branch the table does not have (a third guidance call) uses the last one.
        b = min(branch, len(self.branches) - 1)
        table = self.branches[b]
        if num_steps is None or num_steps == len(table):
            return table
        key = (b, num_steps)
        if key not in self._resampled:
            self._resampled[key] = nearest_resample(table, num_steps)
        return self._resampled[key]


class MagCacheState(PolicyState):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.ratio = 1.0
        self.error = 0.0
        self.skipped = 0
        self.previous_residual: torch.Tensor | None = None  # calibration only

    def cache_nbytes(self) -> int:
        r = self.previous_residual
        return 0 if r is None else r.numel() * r.element_size()


class MagCachePolicy(StepPolicy):
    def __init__(self, config: "MagCacheConfig", table: RatioTable | None, model_id: str = "") -> None:
        self.config = config
        self.table = table
        self.model_id = model_id
        # calibration: branch -> {step index: ratio}
        self.measured: dict[int, dict[int, float]] = {}
        self.measured_steps: int | None = None

    def new_state(self) -> MagCacheState:
        return MagCacheState()

    def retention_steps(self, num_steps: int) -> int:
        # Rounded to nearest as diffusers does: 28 steps x 0.2 -> 6 steps never skipped.
        return int(self.config.retention_ratio * num_steps + 0.5)

    @torch.compiler.disable
    def decide(self, state: MagCacheState, step: Any, signal: torch.Tensor | None) -> bool:
        c = self.config
        if c.calibrate or self.table is None:
            return True
        ratios = self.table.for_branch(step.branch, step.num_steps)
        n = step.num_steps if step.num_steps is not None else len(ratios)
        s = step.index
        if s < self.retention_steps(n) or s >= len(ratios) or (c.compute_last and step.is_last):
            state.ratio, state.error, state.skipped = 1.0, 0.0, 0
            return True
        state.ratio *= ratios[s]
        state.skipped += 1
        state.error += abs(1.0 - state.ratio)
        if state.error <= c.threshold and state.skipped <= c.max_skip_steps:
            return False
        state.ratio, state.error, state.skipped = 1.0, 0.0, 0
        return True

    def after_compute(self, state: MagCacheState, step: Any, span_input: torch.Tensor, span_output: torch.Tensor) -> None:
        if not self.config.calibrate:
            return
        residual = (span_output - span_input).detach().float()
        prev, state.previous_residual = state.previous_residual, residual
        if prev is None or prev.shape != residual.shape:
            ratio = 1.0
        else:
            # mean over tokens of the per-token norm ratio (the paper's gamma_t)
            ratio = float((residual.norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-8)).mean())
        self.measured.setdefault(step.branch, {}).setdefault(step.index, ratio)
        if step.num_steps is not None:
            self.measured_steps = step.num_steps

    def on_run_end(self) -> None:
        if not self.config.calibrate or not self.measured:
            return
        branches = [[r for _, r in sorted(self.measured[b].items())] for b in sorted(self.measured)]
        self.table = RatioTable(branches, "calibrated")
        if self.config.calibration_file:
            with open(self.config.calibration_file, "w") as f:
                json.dump({"model": self.model_id, "steps": self.measured_steps or len(branches[0]),
                           "branches": branches}, f, indent=2)
            logger.info("magcache: wrote ratios of %d branch(es) x %d steps to %s", len(branches), len(branches[0]),
                        self.config.calibration_file)
        self.measured = {}


def _numbers(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value))


def load_table(value: Any, interleaved: bool) -> RatioTable:
    """A ratio table from a list, a list of per-branch lists, a shipped table name, or a calibration file."""
    if isinstance(value, str) and value in TABLES:
        _, _, inter, ratios = TABLES[value]
        return RatioTable.from_flat(ratios, inter, value)
    if isinstance(value, str) and value in FILE_TABLES:
        from importlib import resources

        package, name = FILE_TABLES[value]
        value = str(resources.files(package).joinpath(name))
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(
                f"magcache: mag_ratios {value!r} is neither a shipped table ({', '.join([*TABLES, *FILE_TABLES])}) "
                f"nor a readable ratio file: {e}") from e
        branches = data.get("branches") if isinstance(data, dict) else None
        if not (isinstance(branches, list) and branches and all(_numbers(b) for b in branches)):
            raise ValueError(f"magcache: {value!r} has no 'branches' list of positive ratios (write one with calibrate=True)")
        return RatioTable(branches, str(value))
    if _numbers(value):
        return RatioTable.from_flat(list(value), interleaved, "given")
    if isinstance(value, (list, tuple)) and value and all(_numbers(b) for b in value):
        return RatioTable([list(b) for b in value], "given")
    raise ValueError(
        "magcache: mag_ratios must be a list of positive ratios (one per step), a list of such lists "
        f"(one per guidance branch), a shipped table name ({', '.join(TABLES)}) or a calibration JSON path; got {value!r}")


def table_for(family: str, model_id: str) -> str | None:
    name = model_id.lower()
    for fam, parts, key in MATCH:
        if fam == family and all(p in name for p in parts):
            return key
    return None


@register_policy("magcache", description="magnitude-ratio error accumulation with a skip cap, from per-checkpoint ratio tables (+ calibrate mode)", granularity="step")
@dataclass
class MagCacheConfig:
    """MagCache.

    Args:
        threshold: accumulated error ``sum |1 - prod gamma|`` up to which steps are skipped (δ; diffusers'
            default 0.06; official FLUX 0.24, Wan2.1-1.3B 0.12).
        max_skip_steps: K, the most consecutive skipped steps (diffusers 3; official FLUX 5).
        retention_ratio: fraction of the leading steps always computed (diffusers 0.2; official FLUX 0.1).
        mag_ratios: the ratio table: None (the published table of the checkpoint, recognised from
            its name), a shipped table name (``"FLUX.1-dev"``, ``"Wan2.1-T2V-1.3B"``, ...), a list
            (one ratio per step, or cond/uncond alternating with ``interleaved=True``), a list of
            per-branch lists, or the path of the JSON file ``calibrate`` wrote.
        interleaved: a flat ``mag_ratios`` list alternates cond and uncond entries.
        compute_last: always compute the final step (off, as in the reference code).
        calibrate: compute every step and measure the ratios; after the run they become the table
            (and are written to ``calibration_file``).
        calibration_file: where ``calibrate`` writes the table (JSON: model, steps, branches).
    """

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: Any = None
    interleaved: bool = False
    compute_last: bool = False
    calibrate: bool = False
    calibration_file: str | None = None

    def __post_init__(self) -> None:
        check_float("magcache", "threshold", self.threshold, 0.0)
        check_int("magcache", "max_skip_steps", self.max_skip_steps, 0)
        check_float("magcache", "retention_ratio", self.retention_ratio, 0.0, 1.0)
        check_bool("magcache", "interleaved", self.interleaved)
        check_bool("magcache", "compute_last", self.compute_last)
        check_bool("magcache", "calibrate", self.calibrate)
        if self.calibration_file is not None and not isinstance(self.calibration_file, (str, os.PathLike)):
            raise ValueError(f"magcache: calibration_file must be a path, got {self.calibration_file!r}")
        self._table = None if self.mag_ratios is None else load_table(self.mag_ratios, self.interleaved)

    def build(self, env: PolicyEnv) -> MagCachePolicy:
        require_blocks(env.has_blocks, env.family, "magcache caches the residual of a transformer block chain")
        table = self._table
        if table is None:
            key = table_for(env.family, env.model_id)
            if key is not None:
                table = load_table(key, False)
                logger.info("magcache: ratio table %s for %s", key, env.model_id)
            elif not self.calibrate:
                raise ValueError(
                    f"magcache: no published ratio table for {env.model_id or env.family!r} ({env.family}); "
                    f"pass mag_ratios= (a list, a table name: {', '.join([*TABLES, *FILE_TABLES])}, or a file), or run once with "
                    "calibrate=True, calibration_file='ratios.json' and pass that file")
        return MagCachePolicy(self, table, env.model_id)
