"""`teacache`: Timestep Embedding Aware Cache (arXiv 2411.19108).

Each step the adapter's probe (the first block's timestep-modulated input, or the timestep
embedding for Wan/CogVideoX/PixArt) is compared with the previous step's probe by relative L1.
A per-checkpoint polynomial rescales that distance to an estimate of how much the model output
changed; the estimates accumulate and the block chain is recomputed once they reach
``threshold``, otherwise its cached residual is reused. The probe reference is updated every
step, skipped or not, as in the reference implementation.

``calibrate=True`` fits the polynomial for a checkpoint that has none: every step is computed,
(input change, output change) pairs are collected over the runs, and after each run the fit is
written to ``calibration_file`` for later use as ``coefficients="that/file.json"``.

Example::

    pipe = dcache.accelerate(pipe, policy="teacache", threshold=0.4)
    dcache.accelerate(pipe, policy="teacache", calibrate=True, calibration_file="coeffs.json")
    for p in prompts: pipe(p)                         # a few runs
    dcache.disable(pipe)
    dcache.accelerate(pipe, policy="teacache", coefficients="coeffs.json", threshold=0.3)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dcache.kernels.rel_l1 import rel_l1, rel_l1_rows
from dcache.registry import register_policy
from dcache.schedulers._base import PolicyEnv, PolicyState, StepPolicy
from dcache.schedulers._validate import check_bool, check_float, check_int

logger = logging.getLogger("dcache")

IDENTITY = [1.0, 0.0]  # rescale(d) = d


class TeaCacheState(PolicyState):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.previous_probe: torch.Tensor | None = None
        self.accumulated = 0.0
        self.last_distance: float | None = None
        self.previous_output: torch.Tensor | None = None

    def cache_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.previous_probe, self.previous_output) if t is not None)


class TeaCachePolicy(StepPolicy):
    needs_probe = True

    def __init__(self, config: "TeaCacheConfig", coefficients: list[float], model_id: str = "",
                 warmup_steps: int = 1) -> None:
        self.config = config
        self.warmup_steps = warmup_steps
        self.per_sample = config.per_sample
        self.model_id = model_id  # recorded in the calibration file
        self.coefficients = list(coefficients)
        self._poly = np.poly1d(self.coefficients)
        self.samples: list[tuple[float, float]] = []

    def new_state(self) -> TeaCacheState:
        return TeaCacheState()

    @torch.compiler.disable
    def decide(self, state: TeaCacheState, step: Any, signal: torch.Tensor | None) -> Any:
        if self.per_sample:
            return self._decide_rows(state, step, signal)
        c = self.config
        prev, state.previous_probe = state.previous_probe, signal.detach()
        if prev is None or prev.shape != signal.shape:
            state.accumulated, state.last_distance = 0.0, None
            return True
        d = float(rel_l1(signal, prev, self.group))
        state.last_distance = d
        if c.calibrate or step.index < self.warmup_steps or (c.compute_last and step.is_last):
            state.accumulated = 0.0
            return True
        # The polynomial estimates a size of change: a negative value (outside its fitted range)
        # is no change, never credit that lets later steps skip.
        state.accumulated += max(float(self._poly(d)), 0.0)
        if state.accumulated < c.threshold:
            return False
        state.accumulated = 0.0
        return True

    def _decide_rows(self, state: TeaCacheState, step: Any, signal: torch.Tensor) -> Any:
        """One accumulator per batch row; returns the rows to compute (bool tensor) or True (all)."""
        c = self.config
        prev, state.previous_probe = state.previous_probe, signal.detach()
        rows = signal.shape[0]
        if prev is None or prev.shape != signal.shape:
            state.accumulated, state.last_distance = torch.zeros(rows, dtype=torch.float64), None
            return True
        d = rel_l1_rows(signal, prev, self.group).double().cpu()
        state.last_distance = d
        if c.calibrate or step.index < self.warmup_steps or (c.compute_last and step.is_last):
            state.accumulated = torch.zeros(rows, dtype=torch.float64)
            return True
        rescaled = torch.zeros_like(d)
        for coef in self.coefficients:  # Horner, highest degree first, as np.poly1d
            rescaled = rescaled * d + coef
        acc = state.accumulated + rescaled.clamp_min(0.0)
        compute = acc >= c.threshold
        state.accumulated = torch.where(compute, torch.zeros_like(acc), acc)
        return compute

    def after_compute(self, state: TeaCacheState, step: Any, span_input: torch.Tensor, span_output: torch.Tensor) -> None:
        if not self.config.calibrate:
            return
        prev, state.previous_output = state.previous_output, span_output.detach()
        if prev is not None and prev.shape == span_output.shape and state.last_distance is not None:
            self.samples.append((state.last_distance, float(rel_l1(span_output, prev))))

    def on_run_end(self) -> None:
        if not self.config.calibrate or len(self.samples) < 3:
            return
        x, y = np.array(self.samples).T
        degree = min(4, len(self.samples) - 1)
        coeffs = np.polyfit(x, y, degree).tolist()
        self.coefficients = [0.0] * (5 - len(coeffs)) + coeffs
        self._poly = np.poly1d(self.coefficients)
        if self.config.calibration_file:
            with open(self.config.calibration_file, "w") as f:
                json.dump({"coefficients": self.coefficients, "samples": len(self.samples),
                           "model": self.model_id}, f, indent=2)
            logger.info("teacache: wrote coefficients fitted on %d steps to %s", len(self.samples),
                        self.config.calibration_file)


def load_coefficients(value: Any) -> list[float]:
    """Coefficients given inline, or the JSON file that ``calibrate`` wrote."""
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"teacache: cannot read coefficients file {value!r}: {e}") from e
        value = data.get("coefficients") if isinstance(data, dict) else data
    if (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 5
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"teacache: coefficients must be 1 to 5 numbers (highest degree first), got {value!r}")
    return [float(v) for v in value]


@register_policy("teacache", description="timestep-embedding-aware step cache with per-checkpoint rescaling (+ calibrate mode)", granularity="step")
@dataclass
class TeaCacheConfig:
    """TeaCache.

    Args:
        threshold: accumulated rescaled distance at which the chain is recomputed (the reference
            code's ``rel_l1_thresh``: FLUX 0.25–0.8, HunyuanVideo 0.1–0.15, Wan 1.3B 0.05–0.08).
        coefficients: rescale polynomial, highest degree first, or the path of a calibration JSON.
            None: the published set for the checkpoint (recognised from its name), else the
            family default, else the raw distance with a warning.
        warmup_steps: leading steps always computed. None: the warm-up the coefficient source pairs
            with its coefficients (Wan's ret-steps sets: 5), else 1.
        compute_last: always compute the final step.
        calibrate: compute every step and fit coefficients from the observed changes.
        calibration_file: where ``calibrate`` writes the fitted coefficients (JSON).
        per_sample: one accumulator and decision per batch row: rows that reach the threshold are
            computed, the others reuse (default: one decision for the whole batch).
    """

    threshold: float = 0.3
    coefficients: Any = None
    warmup_steps: int | None = None
    compute_last: bool = True
    calibrate: bool = False
    calibration_file: str | None = None
    per_sample: bool = False

    def __post_init__(self) -> None:
        check_float("teacache", "threshold", self.threshold, 0.0)
        if self.warmup_steps is not None:
            check_int("teacache", "warmup_steps", self.warmup_steps, 0)
        check_bool("teacache", "compute_last", self.compute_last)
        check_bool("teacache", "calibrate", self.calibrate)
        check_bool("teacache", "per_sample", self.per_sample)
        if self.coefficients is not None:
            self.coefficients = load_coefficients(self.coefficients)
        if self.calibration_file is not None and not isinstance(self.calibration_file, (str, os.PathLike)):
            raise ValueError(f"teacache: calibration_file must be a path, got {self.calibration_file!r}")

    def build(self, env: PolicyEnv) -> TeaCachePolicy:
        coeffs = self.coefficients
        if coeffs is None:
            coeffs = env.teacache_coefficients
            if coeffs is None:
                if not self.calibrate:
                    logger.warning(
                        "teacache: %s; using the raw relative-L1 distance. Fit coefficients with calibrate=True.",
                        env.coefficients_source,
                    )
                coeffs = IDENTITY
            else:
                logger.info("teacache: %s", env.coefficients_source)
        warmup = self.warmup_steps
        if warmup is None:
            warmup = env.teacache_warmup_steps if (self.coefficients is None and env.teacache_warmup_steps) else 1
        return TeaCachePolicy(self, coeffs, env.model_id, warmup)
