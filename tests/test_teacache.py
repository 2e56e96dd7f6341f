"""TeaCache specifics: probes per family, coefficient lookup, calibrate mode."""

import json

import pytest
import torch

import dcache
from dcache.pipelines.adapters import get_adapter


def test_checkpoint_coefficients_are_recognised_by_name(tiny_pipes):
    pipe = tiny_pipes("wan")[0]
    adapter = get_adapter(pipe.transformer)
    pipe.transformer.config._name_or_path = "/models/wan2.1-t2v-14b-diffusers"  # a local copy
    coeffs, source = adapter.coefficients_for(pipe.transformer)
    assert "Wan2.1-T2V-14B" in source and coeffs[0] == pytest.approx(-3.03318725e05)
    pipe.transformer.config._name_or_path = ""
    _, source = adapter.coefficients_for(pipe.transformer)
    assert "not recognised" in source


def test_calibrate_writes_coefficients_then_they_are_used(tiny_pipes, tmp_path):
    pipe, kw, attr, _ = tiny_pipes("flux")
    path = tmp_path / "coeffs.json"
    dcache.accelerate(pipe, "teacache", calibrate=True, calibration_file=str(path))
    try:
        for seed in (0, 1):
            pipe(generator=torch.Generator().manual_seed(seed), num_inference_steps=8, **kw)
            assert pipe.dcache.stats()["reused"] == 0  # calibration computes every step
    finally:
        dcache.disable(pipe)
    data = json.loads(path.read_text())
    assert len(data["coefficients"]) == 5 and data["samples"] == 2 * 7
    dcache.accelerate(pipe, "teacache", coefficients=str(path), threshold=0.3)
    try:
        out = getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=8, **kw), attr)
    finally:
        dcache.disable(pipe)
    assert torch.isfinite(out).all()


def test_threshold_zero_never_skips_and_huge_always_skips(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    for thr, expect_reused in [(0.0, 0), (1e9, 8 - 2)]:  # first and last step are always computed
        dcache.accelerate(pipe, "teacache", threshold=thr)
        try:
            pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=8, **kw)
            assert pipe.dcache.stats()["reused"] == expect_reused
        finally:
            dcache.disable(pipe)
