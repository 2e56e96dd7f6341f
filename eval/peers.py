"""Other projects' caches, set up on the same pipeline so they can be measured beside dcache.

Each peer is (source, name, setup) where ``setup(pipe, steps)`` installs it and returns
``(before_each, teardown)``. A peer whose package is missing is skipped with a note.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Peer:
    source: str
    name: str
    options: dict
    setup: Callable[[Any, int], tuple[Callable[[Any], None], Callable[[Any], None]]]
    equivalent: str  # the dcache policy it compares with


def _noop(pipe: Any) -> None:
    pass


def _diffusers(config_factory: Callable[[int], Any]):
    def setup(pipe: Any, steps: int):
        pipe.transformer.enable_cache(config_factory(steps))
        return _noop, lambda p: p.transformer.disable_cache()

    return setup


class _RatioCatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ratios: list[list[float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "MagCache Calibration Results:" in msg:
            self.ratios.append(ast.literal_eval(msg.split("Results:", 1)[1].strip()))


def _diffusers_magcache(threshold: float, max_skip: int, calibration_call: Callable[[Any, int], None]):
    def setup(pipe: Any, steps: int):
        from diffusers import MagCacheConfig

        # MagCache needs ratios calibrated on this checkpoint: one calibration run, ratios read from its log.
        log = logging.getLogger("diffusers.hooks.mag_cache")
        catcher, level = _RatioCatcher(), log.level
        log.addHandler(catcher)
        log.setLevel(logging.INFO)
        try:
            pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
            calibration_call(pipe, steps)
            pipe.transformer.disable_cache()
        finally:
            log.removeHandler(catcher)
            log.setLevel(level)
        if not catcher.ratios:
            raise RuntimeError("MagCache calibration produced no ratios")
        pipe.transformer.enable_cache(MagCacheConfig(mag_ratios=catcher.ratios[0], num_inference_steps=steps,
                                                     threshold=threshold, max_skip_steps=max_skip))
        return _noop, lambda p: p.transformer.disable_cache()

    return setup


def _diffusers_probed(config_factory: Callable[[Any, int], Any], probe_call: Callable[[Any, int], None]):
    """A diffusers cache that needs the pipeline (``current_timestep``) and may crash on it: one probe
    generation runs right after installing, so a crash is reported with its reason, not hidden."""

    def setup(pipe: Any, steps: int):
        pipe.transformer.enable_cache(config_factory(pipe, steps))
        try:
            probe_call(pipe, steps)
        except Exception as e:
            pipe.transformer.disable_cache()
            raise RuntimeError(f"crashed on this pipeline ({type(e).__name__}: {e})") from e
        return _noop, lambda p: p.transformer.disable_cache()

    return setup


def _faster_cache_config(pipe: Any, steps: int) -> Any:
    from diffusers import FasterCacheConfig

    # diffusers' defaults; the attention weight is its documented fallback 0.5, set explicitly.
    return FasterCacheConfig(current_timestep_callback=lambda: pipe.current_timestep,
                             attention_weight_callback=lambda _: 0.5, tensor_format="BCHW")


def _pab_config(pipe: Any, steps: int) -> Any:
    from diffusers import PyramidAttentionBroadcastConfig

    # The docs example's spatial range 2 over diffusers' default window, timesteps (100, 800).
    return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                           spatial_attention_timestep_skip_range=(100, 800),
                                           current_timestep_callback=lambda: pipe.current_timestep)


def _cache_dit(threshold: float, taylorseer: bool, separate_cfg: bool, foca: bool = False):
    def setup(pipe: Any, steps: int):
        import cache_dit

        cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                                      max_warmup_steps=3, max_cached_steps=-1, num_inference_steps=steps,
                                      enable_separate_cfg=separate_cfg)
        kwargs = {"cache_config": cfg}
        if taylorseer:
            kwargs["calibrator_config"] = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1)
        elif foca:
            # cache-dit >= 1.5 ships a FoCa calibrator (no knobs besides the cache's own).
            kwargs["calibrator_config"] = cache_dit.FoCaCalibratorConfig()
        cache_dit.enable_cache(pipe.transformer, **kwargs)

        def before(p: Any) -> None:
            # Without an explicit refresh the first step of the next generation still runs in the old
            # context (shared/reference/cache-dit.md, "off-by-one").
            cache_dit.refresh_context(p.transformer, num_inference_steps=steps)

        return before, lambda p: cache_dit.disable_cache(p.transformer)

    return setup


def available_peers(calibration_call: Callable[[Any, int], None], separate_cfg: bool) -> tuple[list[Peer], list[str]]:
    peers: list[Peer] = []
    notes: list[str] = []
    try:
        from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

        peers += [
            Peer("diffusers", "FirstBlockCache", {"threshold": 0.2},
                 _diffusers(lambda s: FirstBlockCacheConfig(threshold=0.2)), "fbcache"),
            Peer("diffusers", "TaylorSeerCache", {"cache_interval": 6, "disable_cache_before_step": 3, "max_order": 1},
                 _diffusers(lambda s: TaylorSeerCacheConfig(cache_interval=6, disable_cache_before_step=3, max_order=1,
                                                            taylor_factors_dtype=torch.float32)), "taylorseer"),
            Peer("diffusers", "MagCache", {"threshold": 0.12, "max_skip_steps": 4},
                 _diffusers_magcache(0.12, 4, calibration_call), "(none yet)"),
        ]
    except ImportError as e:  # pragma: no cover - diffusers is a hard dependency
        notes.append(f"diffusers peers skipped: {e}")
    try:
        import cache_dit  # noqa: F401

        peers += [
            Peer("cache-dit", "DBCache", {"Fn": 1, "Bn": 0, "residual_diff_threshold": 0.2},
                 _cache_dit(0.2, False, separate_cfg), "fbcache"),
            Peer("cache-dit", "DBCache+TaylorSeer", {"Fn": 1, "Bn": 0, "residual_diff_threshold": 0.2,
                                                     "taylorseer_order": 1},
                 _cache_dit(0.2, True, separate_cfg), "taylorseer"),
        ]
        if hasattr(cache_dit, "FoCaCalibratorConfig"):
            peers.append(Peer("cache-dit", "DBCache+FoCa", {"Fn": 1, "Bn": 0, "residual_diff_threshold": 0.2},
                              _cache_dit(0.2, False, separate_cfg, foca=True), "foca"))
        else:
            notes.append("cache-dit DBCache+FoCa skipped: this cache-dit has no FoCaCalibratorConfig")
    except ImportError:
        notes.append("cache-dit peers skipped: cache-dit is not installed (pip install dcache[peers])")
    try:
        from diffusers import FasterCacheConfig, PyramidAttentionBroadcastConfig  # noqa: F401

        peers += [
            Peer("diffusers", "FasterCache", {"spatial_attention_block_skip_range": 2,
                                              "unconditional_batch_skip_range": 5, "attention_weight": 0.5},
                 _diffusers_probed(_faster_cache_config, calibration_call), "fastercache"),
            Peer("diffusers", "PyramidAttentionBroadcast", {"spatial_attention_block_skip_range": 2,
                                                            "spatial_attention_timestep_skip_range": (100, 800)},
                 _diffusers_probed(_pab_config, calibration_call), "pab"),
        ]
    except ImportError as e:  # pragma: no cover - diffusers is a hard dependency
        notes.append(f"diffusers FasterCache/PAB peers skipped: {e}")
    return peers, notes
