"""`fastercache`: FasterCache (Lv et al., ICLR 2025, arXiv 2410.19355): attention reuse with
extrapolation plus CFG-Cache.

*Attention reuse.* Inside the reuse window, attention is computed every ``attention_skip_range``
steps; at a step in between each attention module returns its last computed output pushed along
its latest change: ``A_t = A_last + w(t) · (A_last − A_prev)`` (the paper's Eq. for
``A_t = A_{t+1} + (A_{t+1} − A_{t+3}) · w(t)``), with ``w`` growing linearly from 0 at the start
of the window to 1 at the end of sampling, as the paper prescribes (diffusers uses a constant
0.5 instead; pass ``attention_weight=0.5`` for that).

*CFG-Cache.* The unconditional prediction is computed only every ``cfg_skip_range`` steps inside
its window. At those steps the difference ``Δ = uncond − cond`` is split in 2-D FFT space
(``fftshift(fft2)`` over the spatial dims of each frame; low frequencies = a disc of radius
``min(H, W) / 5`` around the centre) and cached. At the other steps
``uncond = ifft2(ifftshift(F(cond) + ω_LF · Δ_LF + ω_HF · Δ_HF)).real`` with ``ω_LF = alpha_low``
while progress is in ``low_frequency_window`` (early: outlines) and ``ω_HF = alpha_high`` in
``high_frequency_window`` (late: detail), 1 otherwise (diffusers' defaults: 1.1 and 1.1 over
timesteps (99, 901) and (−1, 301)).

Both CFG layouts work: two denoiser calls per step (the second is not made) and one call on a
batch of 2B (the denoiser runs on the conditional half). Guidance-distilled models (Flux.1-dev,
HunyuanVideo: ``guidance_embeds``) have no unconditional pass and are refused. Windows are in loop
progress ``p = step / num_steps``; diffusers' timestep thresholds t map to ``p = 1 − t / 1000``.

Composed with a feature-level policy (``policy=["taylorseer", "fastercache"]``) only CFG-Cache
is used: the other policy owns the attention modules.

Example::

    pipe = dcache.accelerate(pipe, policy="fastercache", cfg_skip_range=5, attention_skip_range=2)
    pipe = dcache.accelerate(pipe, policy=["taylorseer", "fastercache"])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dcache.registry import register_policy
from dcache.schedulers._attention import AttentionHistory, AttentionPolicy
from dcache.schedulers._base import PolicyEnv, PolicyState
from dcache.schedulers._common import require_blocks
from dcache.schedulers._validate import check_bool, check_float, check_int

LOW_FREQUENCY_RADIUS = 0.2  # of min(H, W): the reference's circle of radius min(H, W) / 5


def progress(step: Any) -> float | None:
    if step.num_steps is None or step.num_steps <= 0:
        return None
    return step.index / step.num_steps


def low_frequency_mask(h: int, w: int, device: Any) -> torch.Tensor:
    """Disc of radius min(h, w)/5 around the centre of an fftshift-ed (h, w) spectrum."""
    yy = torch.arange(h, device=device, dtype=torch.float32)[:, None] - (h // 2)
    xx = torch.arange(w, device=device, dtype=torch.float32)[None, :] - (w // 2)
    return (yy ** 2 + xx ** 2) <= (LOW_FREQUENCY_RADIUS * min(h, w)) ** 2


def spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))


def from_spectrum(s: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft2(torch.fft.ifftshift(s, dim=(-2, -1))).real


class CfgState(PolicyState):
    """Δ of the last step both branches were computed, split into its low/high-frequency parts."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.delta_low: torch.Tensor | None = None
        self.delta_high: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.step: int | None = None

    def cache_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.delta_low, self.delta_high) if t is not None)


class AttentionState(PolicyState):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        pass


class FasterCachePolicy(AttentionPolicy):
    granularity = "cfg-cache"  # the installer: CFG interceptor + this policy's attention part
    history_depth = 2
    name = "fastercache"

    def __init__(self, config: "FasterCacheConfig", ranges: dict[str, int]) -> None:
        self.config = config
        self.ranges = ranges
        self.attention_explicit = config.attention_skip_range is not None

    # -- attention -----------------------------------------------------------------------------
    def new_state(self) -> AttentionState:
        return AttentionState()

    def attention_weight(self, step: Any) -> float:
        c = self.config
        if c.attention_weight is not None:
            return c.attention_weight
        p, start = progress(step) or 0.0, c.attention_window[0]
        return min(max((p - start) / max(1.0 - start, 1e-8), 0.0), 1.0)

    def reuse(self, state: Any, step: Any, kind: str) -> bool:
        c = self.config
        p = progress(step)
        if p is None or p < c.attention_window[0] or (c.compute_last and step.is_last):
            return False
        return step.index % self.ranges[kind] != 0

    def produce(self, history: AttentionHistory, step: Any, kind: str) -> list | None:
        # Extrapolate only from two outputs within one skip range of this step: a branch computed
        # rarely (the uncond pass between CFG-Cache refreshes) is computed instead.
        if len(history.values) < 2 or step.index - history.steps[0] > self.ranges[kind]:
            return None
        w = self.attention_weight(step)
        return [None if a is None else a + w * (a - b) for a, b in zip(history.values[0], history.values[1])]

    # -- CFG-Cache -----------------------------------------------------------------------------
    def new_cfg_state(self) -> CfgState:
        return CfgState()

    def cfg_compute(self, state: CfgState, step: Any) -> bool:
        c = self.config
        p = progress(step)
        return (p is None or p < c.cfg_window_start or step.index % c.cfg_skip_range == 0
                or (c.compute_last and step.is_last))

    def cfg_ready(self, state: CfgState) -> bool:
        return state.delta_low is not None

    def cfg_store(self, state: CfgState, step: Any, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        delta = spectrum(uncond) - spectrum(cond)
        mask = low_frequency_mask(delta.shape[-2], delta.shape[-1], delta.device)
        state.mask, state.step = mask, step.index
        state.delta_low = delta * mask
        state.delta_high = delta * ~mask

    def cfg_weights(self, step: Any) -> tuple[float, float]:
        c = self.config
        p = progress(step) or 0.0
        lo = c.alpha_low if c.low_frequency_window[0] <= p < c.low_frequency_window[1] else 1.0
        hi = c.alpha_high if c.high_frequency_window[0] <= p < c.high_frequency_window[1] else 1.0
        return lo, hi

    def cfg_produce(self, state: CfgState, step: Any, cond: torch.Tensor) -> torch.Tensor | None:
        if state.delta_low is None or state.delta_low.shape != cond.shape:
            return None
        lo, hi = self.cfg_weights(step)
        return from_spectrum(spectrum(cond) + lo * state.delta_low + hi * state.delta_high)


def _window(name: str, value: Any) -> tuple[float, float]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"fastercache: {name} must be a (start, end) pair in [0, 1], got {value!r}")
    for v in value:
        check_float("fastercache", name, v, 0.0, 1.0)
    if value[0] >= value[1]:
        raise ValueError(f"fastercache: {name} start must be below its end, got {tuple(value)!r}")
    return float(value[0]), float(value[1])


@register_policy("fastercache", description="FasterCache: attention reuse with extrapolation + CFG-Cache (uncond rebuilt from cond and a frequency-split delta)", granularity="guidance")
@dataclass
class FasterCacheConfig:
    """FasterCache.

    Args:
        attention_skip_range: inside ``attention_window`` attention is computed at steps
            divisible by it and extrapolated at the others. None: 2 (diffusers' default) alone,
            0 when composed with a feature-level policy. 0: no attention reuse (CFG-Cache only).
        temporal_skip_range: the same for temporal attention (models that have it). None: off.
        attention_window: (start, end) progress of attention reuse; diffusers' timesteps
            (−1, 681) give (0.32, 1.0).
        attention_weight: w of the extrapolation; None: the paper's schedule, 0 at the window
            start growing linearly to 1 at the end of sampling.
        cfg_skip_range: the unconditional pass is computed every ``cfg_skip_range`` steps in its
            window (diffusers' default 5; the paper's Open-Sora/Latte/CogVideoX setting).
        cfg_window_start: progress from which CFG-Cache acts; before it both passes are computed
            (diffusers' timestep 641 → 0.36).
        alpha_low, alpha_high: weights of the cached low/high-frequency Δ (diffusers 1.1, 1.1).
        low_frequency_window, high_frequency_window: progress ranges where those weights apply
            (diffusers' timesteps (99, 901) and (−1, 301) → (0.1, 0.9) and (0.7, 1.0)); 1 outside.
        compute_last: compute the final step fully (attention and both passes).
    """

    attention_skip_range: int | None = None
    temporal_skip_range: int | None = None
    attention_window: tuple[float, float] = (0.32, 1.0)
    attention_weight: float | None = None
    cfg_skip_range: int = 5
    cfg_window_start: float = 0.36
    alpha_low: float = 1.1
    alpha_high: float = 1.1
    low_frequency_window: tuple[float, float] = (0.1, 0.9)
    high_frequency_window: tuple[float, float] = (0.7, 1.0)
    compute_last: bool = True

    def __post_init__(self) -> None:
        for f in ("attention_skip_range", "temporal_skip_range"):
            v = getattr(self, f)
            if v is not None:
                check_int("fastercache", f, v, 0)
        self.attention_window = _window("attention_window", self.attention_window)
        self.low_frequency_window = _window("low_frequency_window", self.low_frequency_window)
        self.high_frequency_window = _window("high_frequency_window", self.high_frequency_window)
        if self.attention_weight is not None:
            check_float("fastercache", "attention_weight", self.attention_weight, 0.0, 2.0)
        check_int("fastercache", "cfg_skip_range", self.cfg_skip_range, 1)
        check_float("fastercache", "cfg_window_start", self.cfg_window_start, 0.0, 1.0)
        check_float("fastercache", "alpha_low", self.alpha_low, 0.0, 4.0)
        check_float("fastercache", "alpha_high", self.alpha_high, 0.0, 4.0)
        check_bool("fastercache", "compute_last", self.compute_last)

    def build(self, env: PolicyEnv) -> FasterCachePolicy:
        if env.guidance_distilled:
            raise ValueError(f"fastercache: {env.guidance_distilled}; CFG-Cache needs a model run with true "
                             "classifier-free guidance (for attention reuse alone use pab)")
        require_blocks(env.has_blocks, env.family, "fastercache reuses attention outputs inside transformer blocks")
        kinds = set(env.attention_kinds)
        spatial = 2 if self.attention_skip_range is None else self.attention_skip_range
        if self.temporal_skip_range and "temporal" not in kinds:
            raise ValueError(f"fastercache: temporal_skip_range={self.temporal_skip_range} asked for, but this "
                             f"model has no temporal attention (it has: {', '.join(sorted(kinds)) or 'none'})")
        ranges = {"spatial": spatial if "spatial" in kinds and spatial > 1 else 0,
                  "temporal": self.temporal_skip_range or 0}
        return FasterCachePolicy(self, ranges)
