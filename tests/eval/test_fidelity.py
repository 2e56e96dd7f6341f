"""LPIPS offline behaviour: omitted with a note naming the file, or computed by lpips with it."""

import os

import pytest
import torch

from dcache.eval import metrics


def test_lpips_is_omitted_without_the_backbone_and_computed_with_it(tmp_path, monkeypatch):
    import lpips
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(metrics, "_lpips_model", None)
    ok, note = metrics.lpips_status()
    want_path = os.path.join(str(tmp_path), "hub", "checkpoints", "alexnet-owt-7be5be79.pth")
    assert not ok and want_path in note
    a = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    b = (a + 0.1).clamp(0, 1)
    assert metrics.lpips_distance(a, b) is None

    # A stand-in AlexNet checkpoint (random weights, the real file's keys) where torchvision looks.
    torch.manual_seed(3)
    backbone = torchvision.models.alexnet()
    os.makedirs(os.path.dirname(want_path))
    torch.save(backbone.state_dict(), want_path)
    assert metrics.lpips_status()[0]
    got = metrics.lpips_distance(a, b)
    # Independently: lpips with a random trunk, then the same backbone weights copied in.
    ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    feats = backbone.features
    layers = [m for m in feats if isinstance(m, torch.nn.Conv2d)]
    ref_convs = [m for m in ref.net.modules() if isinstance(m, torch.nn.Conv2d)]
    for dst, src in zip(ref_convs, layers):
        dst.load_state_dict(src.state_dict())
    with torch.no_grad():
        want = float(ref(a.repeat(1, 3, 1, 1) * 2 - 1, b.repeat(1, 3, 1, 1) * 2 - 1).mean())
    assert got == pytest.approx(want, rel=1e-5) and got > 0
    assert metrics.lpips_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    monkeypatch.setattr(metrics, "_lpips_model", None)  # do not leave the stand-in model to later tests


def test_psnr_capped_counts_identical_samples_as_100_db():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[1] += 0.1  # MSE 0.01 -> 20 dB
    assert metrics.psnr_capped(a, b) == pytest.approx((100 + 20) / 2)
    assert metrics.psnr_capped(a, a) == float("inf")
    assert metrics.psnr(a, b) == float("inf")  # the plain mean, which hides the drift
