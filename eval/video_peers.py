"""Peer rows for diffusers video pipelines: eval/peers.py's rows, with diffusers' TaylorSeerCache aimed
at the attention modules video transformers really have.

diffusers' TaylorSeerCache matches its default patterns (``^blocks.*attn`` ...) with
``re.fullmatch``, so on Wan, CogVideoX and LTX, whose attention modules are ``attn1``/``attn2``,
it registers no hook and runs the baseline under another name (shared/reference/diffusers-hooks.md,
"Regex on qualified names"). Here its ``cache_identifiers`` also match a trailing digit, and any
peer that ends up with no hook at all is refused (a skipped row with a note), never reported as
a 1x "cache".
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from dcache.eval.peers import Peer, available_peers

__all__ = ["video_peers", "TAYLORSEER_VIDEO_IDENTIFIERS", "count_diffusers_hooks"]

TAYLORSEER_VIDEO_IDENTIFIERS = [r"^blocks.*attn\d?", r"^transformer_blocks.*attn\d?",
                                r"^single_transformer_blocks.*attn\d?", r"^temporal_transformer_blocks.*attn\d?"]
_OPTS = {"cache_interval": 6, "disable_cache_before_step": 3, "max_order": 1}


def count_diffusers_hooks(module: torch.nn.Module, name: str) -> int:
    """Modules under ``module`` carrying diffusers' hook ``name`` (e.g. ``"taylorseer_cache"``)."""
    n = 0
    for m in module.modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None and reg.get_hook(name) is not None:
            n += 1
    return n


def _taylorseer_video(pipe: Any, steps: int):
    from diffusers import TaylorSeerCacheConfig

    pipe.transformer.enable_cache(TaylorSeerCacheConfig(**_OPTS, taylor_factors_dtype=torch.float32,
                                                        cache_identifiers=TAYLORSEER_VIDEO_IDENTIFIERS))
    if count_diffusers_hooks(pipe.transformer, "taylorseer_cache") == 0:
        pipe.transformer.disable_cache()
        raise RuntimeError(f"no module of {type(pipe.transformer).__name__} matches TaylorSeer's identifiers")
    return (lambda p: None), (lambda p: p.transformer.disable_cache())


def video_peers(calibration_call: Callable[[Any, int], None], separate_cfg: bool) -> tuple[list[Peer], list[str]]:
    """eval/peers.py's peers with diffusers' TaylorSeerCache replaced by the video-aware one."""
    peers, notes = available_peers(calibration_call, separate_cfg)
    out = []
    for p in peers:
        if p.source == "diffusers" and p.name == "TaylorSeerCache":
            p = Peer("diffusers", "TaylorSeerCache", {**_OPTS, "cache_identifiers": "attn|attnN"},
                     _taylorseer_video, p.equivalent)
        out.append(p)
    return out, notes
