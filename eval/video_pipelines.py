"""diffusers pipelines as ``dcache eval`` targets: what a ``--model`` holds, read before it is loaded.

``inspect_model`` reads only ``model_index.json`` (a local directory, or the local Hugging Face
cache for a hub id), so a directory that is not a pipeline, one without a denoiser, or a video
option given to an image pipeline is refused before any weights are read. Video pipelines (Wan,
CogVideoX, LTX, HunyuanVideo, ... : every diffusers pipeline whose ``__call__`` takes
``num_frames``) return ``(1, C, F, H, W)`` in [0, 1] from :func:`video_draw`.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from dcache.eval.cli_errors import UsageError

__all__ = ["PipelineInfo", "inspect_model", "fps_of", "check_frames", "as_video"]

DENOISERS = ("transformer", "unet")
# Frame rates the model cards export with (diffusers' docs, ``export_to_video(..., fps=...)``);
# only the MP4 playback speed depends on it.
FPS = {"WanPipeline": 16, "CogVideoXPipeline": 8, "LTXPipeline": 24, "HunyuanVideoPipeline": 15}


@dataclass(frozen=True)
class PipelineInfo:
    class_name: str
    video: bool
    has_text_encoder: bool
    takes_prompt: bool


def _index(model: str) -> tuple[dict | None, str | None]:
    """(model_index.json, the folder it sits in) of a local directory or a cached hub id."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        f = os.path.join(path, "model_index.json")
        if not os.path.isfile(f):
            raise UsageError(f"--model {model!r} is not a diffusers pipeline directory (no model_index.json); "
                             "save one with pipe.save_pretrained(DIR)")
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            f = try_to_load_from_cache(model, "model_index.json")
        except Exception:  # noqa: BLE001 - not in the cache: the loader decides later
            f = None
        if not isinstance(f, str):
            return None, None
    try:
        with open(f) as fh:
            return json.load(fh), os.path.dirname(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--model {model!r}: model_index.json is unreadable ({type(e).__name__})") from None


def _component(index: dict, name: str) -> bool:
    v = index.get(name)
    return isinstance(v, list) and len(v) == 2 and v[0] is not None and v[1] is not None


def inspect_model(model: str) -> PipelineInfo | None:
    """What ``--model`` is, from its model_index.json; None for an uncached hub id (decided on loading)."""
    index, root = _index(model)
    if index is None:
        return None
    name = str(index.get("_class_name", ""))
    denoisers = [d for d in DENOISERS if _component(index, d)]
    if not denoisers:
        raise UsageError(f"--model {model!r} ({name or 'no _class_name'}) has no transformer or unet; "
                         "dcache caches the denoiser of a diffusers pipeline")
    if os.path.isdir(os.path.expanduser(model)):
        missing = [d for d in denoisers if not os.path.isdir(os.path.join(root, d))]
        if missing:
            raise UsageError(f"--model {model!r}: model_index.json names a {missing[0]} but the folder "
                             f"{missing[0]}/ is missing")
    params: dict[str, Any] = {}
    try:
        import diffusers

        cls = getattr(diffusers, name, None)
        if cls is not None:
            params = dict(inspect.signature(cls.__call__).parameters)
    except ImportError:  # pragma: no cover - diffusers is a hard dependency
        pass
    return PipelineInfo(class_name=name, video="num_frames" in params,
                        has_text_encoder=_component(index, "text_encoder") and _component(index, "tokenizer"),
                        takes_prompt="prompt" in params)


def fps_of(pipe: Any) -> int:
    return FPS.get(type(pipe).__name__, 8)


def check_frames(pipe: Any, num_frames: int | None) -> None:
    """The pipeline decodes ``num_frames`` exactly: with a temporal VAE factor T it must be k*T + 1
    (diffusers otherwise rounds it silently or fails after the denoising loop)."""
    t = getattr(pipe, "vae_scale_factor_temporal", None)
    if num_frames is None or not isinstance(t, int) or t <= 1:
        return
    if (num_frames - 1) % t:
        lo = (num_frames - 1) // t * t + 1
        raise UsageError(f"--num-frames {num_frames}: {type(pipe).__name__} decodes k*{t}+1 frames "
                         f"(its VAE compresses time by {t}); use {lo} or {lo + t}")


def as_video(out: Any) -> torch.Tensor:
    """A diffusers video pipeline's output (``frames``: (B, F, C, H, W) tensor for ``output_type="pt"``,
    or (B, F, H, W, C) arrays) → (1, C, F, H, W) float in [0, 1] on the CPU."""
    x = getattr(out, "frames", None)
    if x is None:
        x = out[0]
    x = torch.as_tensor(x if not isinstance(x, list) else torch.stack([torch.as_tensor(v) for v in x])).float().cpu()
    if x.ndim != 5:
        raise ValueError(f"video pipeline returned frames of shape {tuple(x.shape)}; expected (B, F, C, H, W)")
    if x.shape[-1] in (1, 3) and x.shape[2] not in (1, 3):
        x = x.permute(0, 1, 4, 2, 3)
    return x[:1].permute(0, 2, 1, 3, 4).clamp(0, 1).contiguous()
