"""FID/KID and CLIP score: torchmetrics' classes with tiny real networks, against the formulas."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from dcache.cli import main as cli
from dcache.eval import distribution

from .helpers import TinyFeatures, tiny_clip


def _fid_by_hand(fa, fb):
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def _kid_by_hand(fa, fb):
    d, m = fa.shape[1], fa.shape[0]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731 - torchmetrics' default polynomial kernel
    kxx, kyy, kxy = k(fa, fa), k(fb, fb), k(fa, fb)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2)


def test_fid_kid_equal_the_formulas_on_the_extractor_features():
    g = torch.Generator().manual_seed(1)
    real = torch.rand(24, 1, 16, 16, generator=g)
    fake = (real + 0.3 * torch.rand(24, 1, 16, 16, generator=g)).clamp(0, 1)
    net = TinyFeatures()
    got = distribution.fid_kid(real, fake, feature=net)
    with torch.no_grad():
        fa, fb = (net(x.repeat(1, 3, 1, 1)).double().numpy() for x in (real, fake))
    assert got["fid"] == pytest.approx(_fid_by_hand(fa, fb), rel=1e-3, abs=1e-6)
    assert got["kid"] == pytest.approx(_kid_by_hand(fa, fb), rel=1e-3, abs=1e-8)
    assert got["fid"] > 0
    same = distribution.fid_kid(real, real, feature=net)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["fid"] < got["fid"]


def test_clip_score_equals_the_clamped_mean_cosine(tmp_path):
    path = tiny_clip(str(tmp_path / "clip"))
    model, proc = distribution.load_clip(path)
    g = torch.Generator().manual_seed(2)
    images = torch.rand(4, 3, 32, 32, generator=g)
    captions = ["a red circle", "a digit 7", "two blue squares", "a handwritten digit 3"]
    x = list(images.mul(255).round().to(torch.uint8))
    with torch.no_grad():
        ie = model.get_image_features(pixel_values=proc(images=x, return_tensors="pt")["pixel_values"])
        t = proc(text=captions, return_tensors="pt", padding=True)
        te = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        cos = torch.nn.functional.cosine_similarity(ie, te)
        if cos.mean() <= 0:  # random weights: flip the text projection so the clamp at 0 does not hide it
            model.model.text_projection.weight.neg_()
            cos = -cos
    want = max(float(100 * cos.mean()), 0.0)  # torchmetrics' CLIPScore clamps the mean, not each pair
    assert want > 0
    assert distribution.clip_score(images, captions, (model, proc)) == pytest.approx(want, rel=1e-4)


def test_eval_with_fid_extractor_and_clip_model(tmp_path):
    ts = tmp_path / "features.pt"
    torch.jit.script(TinyFeatures()).save(str(ts))
    clip = tiny_clip(str(tmp_path / "clip"))
    out = tmp_path / "o"
    assert cli(["eval", "--steps", "3", "--num-samples", "3", "--threads", "1", "--policy", "static(interval=3)",
                "--fid", "--fid-extractor", str(ts), "--clip-model", clip, "--pareto-metric", "fid",
                "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    base, acc = res["rows"]
    assert base["fid"] == pytest.approx(0.0, abs=1e-6) and acc["fid"] > base["fid"]
    assert acc["kid"] is not None and "kid_std" in acc
    assert base["clip_score"] is not None and acc["clip_score"] is not None
    assert any("FID/KID on 3 samples are heavily biased" in n for n in res["meta"]["notes"])


def test_inception_path_is_checked_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(ValueError) as e:
        distribution.prepare(fid=True, inception_weights=None, fid_extractor=None, clip_model=None, num_samples=4)
    msg = str(e.value)
    assert "--inception-weights PATH" in msg and str(tmp_path / "th" / "hub" / "checkpoints") in msg
