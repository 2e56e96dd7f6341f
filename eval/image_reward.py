"""ImageReward (THUDM's ``image-reward`` package) as an optional ``dcache eval`` metric.

Trial in this project's environment (torch 2.14.1, transformers 5.24.0), 2026-12-01: the current
release, image-reward 1.5, installs with ``pip install --no-deps`` (its pins: timm==0.6.13,
fairscale==0.4.13, plus openai-clip, ftfy, wcwidth), but ``import ImageReward`` fails in
``ImageReward/models/BLIP/med.py``: ``cannot import name 'apply_chunking_to_forward' from
'transformers.modeling_utils'`` (removed in transformers 5). It also downloads its checkpoint
(``THUDM/ImageReward``) and BERT tokenizer on first use. So it is resolved here, before any
sample, and refused with one line when it cannot run; where it imports, each sample is scored
with ``model.score(prompt, image)`` (videos: the mean over frames). That scoring path follows
the package's README API and has not run in this project (the package cannot import here).
"""

from __future__ import annotations

from typing import Any

import torch

from dcache.eval.cli_errors import UsageError

__all__ = ["DEFAULT_MODEL", "load", "score"]

DEFAULT_MODEL = "ImageReward-v1.0"
_ACCEPTED = (f"--image-reward takes {DEFAULT_MODEL} (the default) or a path to an ImageReward .pt checkpoint, "
             "and needs the image-reward package importable")


def load(name: str, device: str) -> Any:
    """The ImageReward model, or a one-line :class:`UsageError` saying why it cannot run here."""
    try:
        import ImageReward as RM  # noqa: N813 - the package's own name
    except ModuleNotFoundError as e:
        if e.name == "ImageReward":
            import transformers

            hint = (f"; image-reward 1.5 does not import with transformers {transformers.__version__} "
                    "(needs < 5: it imports transformers.modeling_utils.apply_chunking_to_forward)"
                    if int(transformers.__version__.split(".")[0]) >= 5 else "")
            raise UsageError(f"{_ACCEPTED}: it is not installed (pip install image-reward){hint}") from None
        raise UsageError(f"{_ACCEPTED}: it does not import here (ModuleNotFoundError: {e})") from None
    except Exception as e:  # noqa: BLE001 - any import failure reads the same to the user
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"{_ACCEPTED}: it does not import here ({type(e).__name__}: {msg})") from None
    try:
        return RM.load(name, device=device)
    except Exception as e:  # noqa: BLE001 - offline, missing checkpoint, ...
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"{_ACCEPTED}: cannot load {name!r} ({type(e).__name__}: {msg})") from None


def score(model: Any, images: torch.Tensor, captions: list[str]) -> float:
    """Mean ImageReward of images (N, C, H, W) or videos (N, C, F, H, W) in [0, 1] against captions."""
    from PIL import Image

    from dcache.eval.samples import to_uint8

    vals = []
    with torch.no_grad():
        for x, cap in zip(images, captions):
            frames = x.transpose(0, 1) if x.ndim == 4 else x[None]
            for f in frames:
                arr = to_uint8(f)
                pil = Image.fromarray(arr).convert("RGB")
                r = model.score(cap, pil)
                vals.append(float(r[0] if isinstance(r, (list, tuple)) else r))
    return sum(vals) / len(vals)
