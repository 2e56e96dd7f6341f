"""The recency bias (planted head roles): cached attention == dense block-causal attention with the bias."""

import json

import pytest
import torch

import dcache
from ar_checks import assert_cached_loop_equals_dense
from dcache.pipelines.ar_video.attention import RecencyBias
from dcache.pipelines.ar_video.pipeline import ARVideoPipeline

TOL = 1e-4
SLOPES = [[2.0, 0.3, 1.0, 0.0], [0.5, 2.0, 0.0, 1.5]]


@pytest.fixture
def rpipe(pipe):
    return ARVideoPipeline(pipe.transformer, pipe.config, recency=RecencyBias(SLOPES, sink_frames=1))


def test_bias_values():
    rb = RecencyBias(SLOPES, sink_frames=1)
    q = torch.tensor([4, 4, 5])
    k = torch.tensor([0, 1, 3, 4, 5])
    b = rb(1, torch.tensor([0, 3]), q, k, torch.float32)
    assert b.shape == (1, 2, 3, 5)  # 4-D keeps torch's CPU flash kernel
    b = b[0]
    assert b[0, 0].tolist() == [0.0, -1.5, -0.5, 0.0, 0.0]  # sink frame 0 is exempt; same/later frames 0
    assert b[1, 2].tolist() == [0.0, -6.0, -3.0, -1.5, 0.0]
    assert torch.equal(rb(0, slice(1, 3), q, k, torch.float32), rb(0, None, q, k, torch.float32)[:, 1:3])


def test_bias_validation(pipe):
    with pytest.raises(ValueError, match=r"\[layers\]\[heads\]"):
        RecencyBias([1.0, 2.0])
    with pytest.raises(ValueError, match="values >= 0"):
        RecencyBias([[1.0, -1.0]])
    with pytest.raises(ValueError, match="2 layers x 4 heads"):
        ARVideoPipeline(pipe.transformer, pipe.config, recency={"slopes": [[1.0] * 4] * 3})


def test_cached_loop_equals_dense_forward_with_bias(rpipe, emb):
    assert_cached_loop_equals_dense(rpipe, emb, num_frames=9, tol=TOL)


def test_bias_changes_the_output_and_forcing_kv_unlimited_still_equals_full(rpipe, emb, head_file):
    ref = rpipe(emb, num_frames=12, seed=3).latents
    rec, rpipe.ctx.recency = rpipe.ctx.recency, None  # the same model without its bias
    assert (rpipe(emb, num_frames=12, seed=3).latents - ref).abs().max() > 1e-3  # not vacuous
    rpipe.ctx.recency = rec
    # head groups + ring/selected regions in another key order: the per-key frames must follow the keys
    dcache.accelerate(rpipe, policy="forcing-kv", head_file=head_file, static_ctx_frames=12, dynamic_ring_frames=12)
    assert (rpipe(emb, num_frames=12, seed=3).latents - ref).abs().max() < TOL
    dcache.accelerate(rpipe, policy="kv-rolling", sink_frames=1, window_frames=2)
    assert (rpipe(emb, num_frames=12, seed=3).latents - ref).abs().max() > 1e-4


def test_bias_round_trips_through_save_and_load(rpipe, emb, tmp_path):
    rpipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "temporal_bias.json").read_text()) == {"slopes": SLOPES, "sink_frames": 1}
    loaded = ARVideoPipeline.from_pretrained(tmp_path)
    assert torch.equal(loaded.ctx.recency.slopes, rpipe.ctx.recency.slopes)
    assert (loaded(emb, num_frames=6, seed=1).latents - rpipe(emb, num_frames=6, seed=1).latents).abs().max() < TOL
