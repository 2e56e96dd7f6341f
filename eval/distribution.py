"""FID / KID (torchmetrics) of accelerated samples against the baseline's, and CLIP score.

All three are torchmetrics' own metric classes. What changes is only where the feature network
comes from, and every source is resolved in :func:`prepare` before any sample is generated:

* FID/KID with Inception: ``--inception-weights PATH`` or torch-fidelity's file in the torch hub
  cache (``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``); the
  network code comes from torch-fidelity. No download is attempted.
* FID/KID with any other network: ``--fid-extractor FILE``, a TorchScript module mapping
  (N, 3, H, W) float images in [0, 1] to (N, D) features (tests use a tiny one).
* CLIP score: ``--clip-model`` hub id (from the local cache when ``HF_HUB_OFFLINE=1``) or a local
  directory with a ``CLIPModel`` and its processor.

With few samples FID is strongly biased (the covariance has rank < N): compare rows of one run,
never numbers from runs of different sizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from dcache.eval.cli_errors import UsageError

__all__ = ["Scorers", "prepare", "inception_cache_path", "fid_kid", "clip_score", "load_clip"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def inception_cache_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def _rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    x = images.clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.mul(255).round().to(torch.uint8)  # rounded: torchmetrics' own cast truncates


def _rgb_float(images: torch.Tensor) -> torch.Tensor:
    x = images.clamp(0, 1).float()
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def fid_kid(real: torch.Tensor, fake: torch.Tensor, feature: torch.nn.Module | None = None,
            inception_weights: str | None = None) -> dict[str, float]:
    """FID and KID (mean, std) of ``fake`` against ``real``; images (N, C, H, W) in [0, 1].

    ``feature``: a module mapping (N, 3, H, W) float in [0, 1] to (N, D); else Inception from
    ``inception_weights``. KID's subsets are capped at the sample count.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(real.shape[0], fake.shape[0])
    if n < 2:
        raise ValueError("FID/KID need at least 2 samples per side")
    if feature is not None:
        fid = FrechetInceptionDistance(feature=feature, normalize=True, input_img_size=tuple(_rgb_float(real[:1]).shape[1:]))
        kid = KernelInceptionDistance(feature=feature, subset_size=min(1000, n), normalize=True)
        prep = _rgb_float
    else:
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=inception_weights)
        kid = KernelInceptionDistance(feature=fid.inception, subset_size=min(1000, n))
        prep = _rgb_uint8
    with torch.no_grad():
        for m in (fid, kid):
            m.update(prep(real), real=True)
            m.update(prep(fake), real=False)
        kid_mean, kid_std = kid.compute()
        return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


class _ClipFeatures(torch.nn.Module):
    """CLIPModel whose feature methods return tensors (transformers 5 returns model outputs,
    which torchmetrics 1.9 cannot take; shared/reference/eval-tools.md §3.2)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def _unwrap(self, out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *a: Any, **k: Any) -> torch.Tensor:
        return self._unwrap(self.model.get_image_features(*a, **k))

    def get_text_features(self, *a: Any, **k: Any) -> torch.Tensor:
        return self._unwrap(self.model.get_text_features(*a, **k))


def load_clip(name_or_path: str) -> tuple[Any, Any]:
    """(model wrapper, processor) from a local directory or the local hub cache; no download when offline."""
    from transformers import CLIPModel, CLIPProcessor

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    local = os.path.isdir(name_or_path)
    try:
        model = CLIPModel.from_pretrained(name_or_path, local_files_only=offline or local).eval()
        proc = CLIPProcessor.from_pretrained(name_or_path, local_files_only=offline or local)
    except Exception as e:  # noqa: BLE001 - any loading failure reads the same to the user
        where = "that directory holds no CLIPModel" if local else (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading" if offline
            else "it could not be loaded")
        raise UsageError(f"--clip-model {name_or_path!r}: {where} ({type(e).__name__}); give a local directory "
                         f"with a CLIPModel and its processor, or a cached hub id") from None
    return _ClipFeatures(model), proc


def clip_score(images: torch.Tensor, captions: list[str], model_and_processor: tuple[Any, Any]) -> float:
    """torchmetrics CLIPScore of images against captions: max(mean(100 x cosine), 0)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: model_and_processor)
    with torch.no_grad():
        metric.update(list(_rgb_uint8(images)), list(captions))  # uint8: the processor rescales itself
        return float(metric.compute())


@dataclass
class Scorers:
    fid: Any = None  # a feature module, or "inception"
    inception_weights: str | None = None
    clip: tuple[Any, Any] | None = None
    image_reward: Any = None  # an ImageReward model (dcache.eval.image_reward)
    notes: list[str] = field(default_factory=list)

    def fid_kid(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        if real.shape[0] < 2:
            return {}
        feature = None if self.fid == "inception" else self.fid
        return fid_kid(real, fake, feature, self.inception_weights)

    def clip_score(self, images: torch.Tensor, captions: list[str]) -> float:
        return clip_score(images, captions, self.clip)


def prepare(fid: bool, inception_weights: str | None, fid_extractor: str | None, clip_model: str | None,
            num_samples: int) -> Scorers:
    """Resolve every requested metric's network now; refuse with one line if one is missing."""
    s = Scorers()
    if (inception_weights or fid_extractor) and not fid:
        raise UsageError("--inception-weights / --fid-extractor need --fid")
    if fid:
        if num_samples < 2:
            raise UsageError("--fid needs at least 2 samples (--num-samples 2 or more)")
        if fid_extractor:
            try:
                s.fid = torch.jit.load(fid_extractor, map_location="cpu").eval()
            except Exception as e:  # noqa: BLE001
                raise UsageError(f"--fid-extractor {fid_extractor!r} is not a TorchScript module ({type(e).__name__})") from None
        else:
            path = inception_weights or inception_cache_path()
            if not os.path.isfile(path):
                raise UsageError(f"--fid needs Inception weights: pass --inception-weights PATH, or put {INCEPTION_FILE} "
                                 f"in the torch hub cache ({path}); or use --fid-extractor FILE")
            try:
                import torch_fidelity  # noqa: F401
            except ImportError:
                raise UsageError("--fid with Inception needs torch-fidelity (pip install torch-fidelity), "
                                 "or use --fid-extractor FILE") from None
            s.fid, s.inception_weights = "inception", path
        if num_samples < 50:
            s.notes.append(f"FID/KID on {num_samples} samples are heavily biased: compare rows of this run only")
    if clip_model:
        s.clip = load_clip(clip_model)
    return s
