"""Fidelity of accelerated outputs to the baseline: PSNR, SSIM (torchmetrics) and LPIPS (lpips).

Images are float tensors (N, C, H, W) in [0, 1]; per-sample scores are averaged. LPIPS needs the
ImageNet-trained backbone, which cannot be downloaded here: it is reported only when the weights
are already in torch's hub cache, never computed with a random backbone.
"""

from __future__ import annotations

import os

import torch


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"expected images as (N, C, H, W) in [0, 1], got shape {tuple(a.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-sample PSNR in dB (data range 1). Identical images give +inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check(a, b)
    vals = [peak_signal_noise_ratio(x[None].float(), y[None].float(), data_range=1.0) for x, y in zip(a, b)]
    return float(torch.stack(vals).mean())


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check(a, b)
    # The default 11-pixel Gaussian window needs images at least that large.
    k = min(11, (min(a.shape[-2:]) // 2) * 2 - 1)
    return float(structural_similarity_index_measure(a.float(), b.float(), data_range=1.0, kernel_size=k))


_ALEXNET = "alexnet-owt-7be5be79.pth"


def lpips_status() -> tuple[bool, str]:
    """(available, note). Available only with the real AlexNet weights in torch's hub cache."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False, "lpips omitted: the lpips package is not installed (pip install dcache[eval])"
    path = os.path.join(torch.hub.get_dir(), "checkpoints", _ALEXNET)
    if not os.path.isfile(path):
        return False, f"lpips omitted: AlexNet weights not found at {path} (no download here; a random backbone is not LPIPS)"
    return True, "lpips: AlexNet backbone from the torch hub cache"


_lpips_model = None


def lpips_distance(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean LPIPS (AlexNet), or None when the backbone weights are unavailable."""
    global _lpips_model
    ok, _ = lpips_status()
    if not ok:
        return None
    _check(a, b)
    if _lpips_model is None:
        import lpips

        _lpips_model = lpips.LPIPS(net="alex", verbose=False).eval()
    x, y = a.float(), b.float()
    if x.shape[1] == 1:
        x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return float(_lpips_model(x * 2 - 1, y * 2 - 1).mean())


PSNR_CAP_DB = 100.0


def psnr_capped(a: torch.Tensor, b: torch.Tensor, cap: float = PSNR_CAP_DB) -> float:
    """Mean per-sample PSNR where an identical sample counts as ``cap`` dB (TeaCache's convention
    for per-frame PSNR); +inf only when every sample is identical.

    A plain mean turns into +inf as soon as one sample (one early video frame, say) is identical,
    hiding the drift of all the others.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check(a, b)
    vals = [float(peak_signal_noise_ratio(x[None].float(), y[None].float(), data_range=1.0)) for x, y in zip(a, b)]
    if all(v == float("inf") for v in vals):
        return float("inf")
    return sum(min(v, cap) for v in vals) / len(vals)
