"""The shipped reference model loads, runs under every policy, and its head file is valid."""

import os

import pytest
import torch

import dcache
from dcache.pipelines.ar_video.reference import reference_dir

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(reference_dir(), "config.json")), reason="reference weights not shipped")


def test_reference_model_runs_under_every_policy():
    from dcache.pipelines.ar_video.reference import load_reference
    from dcache.schedulers._forcing_heads import load_head_file

    pipe = load_reference()
    split = load_head_file(pipe.head_file, pipe.num_layers, pipe.num_heads)
    assert sum(split.counts()) == pipe.num_layers * pipe.num_heads
    ref = pipe(prompt=[(4, 1, 2)], num_frames=9, seed=0).frames
    assert ref.shape == (1, 1, 9, 24, 24)
    for name in ("kv-rolling", "forcing-kv"):
        dcache.accelerate(pipe, policy=name)
        out = pipe(prompt=[(4, 1, 2)], num_frames=9, seed=0).frames
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert pipe.dcache.stats()["kv_bytes"] > 0
    dcache.disable(pipe)


def test_occlusion_model_runs_under_every_policy_and_declares_its_world():
    from dcache.pipelines.ar_video import occlusion as occ
    from dcache.schedulers._forcing_heads import load_head_file

    if not os.path.exists(os.path.join(occ.occlusion_dir(), "config.json")):
        pytest.skip("occlusion weights not shipped")
    assert occ.model_world(occ.occlusion_dir()) == "occlusion"
    pipe = occ.load_occlusion()
    assert pipe.ctx.recency is None  # no planted bias in this model
    split = load_head_file(pipe.head_file, pipe.num_layers, pipe.num_heads)
    assert sum(split.counts()) == pipe.num_layers * pipe.num_heads
    lat, prompts, _ = occ.make_batch(2, 9, torch.Generator().manual_seed(0), digit_pool="test")
    ref = pipe(prompt=prompts, num_frames=9, seed=0, context_frames=lat[:, :, :3]).frames
    assert ref.shape == (2, 1, 9, 24, 24)
    for name in ("kv-rolling", "forcing-kv"):
        dcache.accelerate(pipe, policy=name)
        out = pipe(prompt=prompts, num_frames=9, seed=0, context_frames=lat[:, :, :3]).frames
        assert out.shape == ref.shape and torch.isfinite(out).all()
    dcache.disable(pipe)
