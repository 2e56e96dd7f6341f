"""The cached chunk loop computes exactly what one block-causal forward computes."""

import pytest
import torch

import dcache
from ar_checks import assert_cached_loop_equals_dense
from dcache.pipelines.ar_video.pipeline import block_causal_frame_mask

TOL = 1e-4  # fp32; observed max |diff| ~1e-6 on outputs of magnitude ~3


def test_rope_wrapper_matches_diffusers_rope(pipe):
    x = torch.randn(1, 4, 5, 8, 12)
    ref = pipe.transformer.rope.inner(x)
    pipe.ctx.frame_positions = None
    ours = pipe.transformer.rope(x)
    assert torch.equal(ref[0], ours[0]) and torch.equal(ref[1], ours[1])
    pipe.ctx.frame_positions = torch.arange(3, 8)
    shifted = pipe.transformer.rope(x)
    pipe.ctx.frame_positions = None
    big = pipe.transformer.rope.inner(torch.randn(1, 4, 8, 8, 12))
    assert torch.equal(shifted[0], big[0][:, 3 * 24 :])


def test_full_cache_equals_block_causal_forward(pipe, emb):
    assert_cached_loop_equals_dense(pipe, emb, num_frames=9, tol=TOL)


def test_mask_matters(pipe, emb):
    """Guard against a vacuous exactness test: dropping the causal mask changes the output."""
    pipe.trace = []
    pipe(emb, num_frames=6, seed=0)
    clean = torch.cat([t["x"] for t in pipe.trace if t["commit"]] + [pipe.trace[-1]["x"]], 2)
    v_c = pipe.forward_dense(clean, torch.zeros(1, 6), emb, frame_mask=block_causal_frame_mask(6, 3))
    v_n = pipe.forward_dense(clean, torch.zeros(1, 6), emb, frame_mask=None)
    assert (v_c[:, :, :3] - v_n[:, :, :3]).abs().max() > 1e-3


def test_forcing_kv_unlimited_budget_equals_full(pipe, emb, head_file):
    ref = pipe(emb, num_frames=12, seed=3).latents
    dcache.accelerate(pipe, policy="forcing-kv", head_file=head_file, static_ctx_frames=12, dynamic_ring_frames=12, sink_frames=1)
    out = pipe(emb, num_frames=12, seed=3).latents
    assert (out - ref).abs().max() < TOL
    dcache.accelerate(pipe, policy="forcing-kv", head_file=head_file)  # default budgets do differ
    small = pipe(emb, num_frames=12, seed=3).latents
    assert (small - ref).abs().max() > 1e-3


def test_rolling_with_large_window_equals_full(pipe, emb):
    ref = pipe(emb, num_frames=9, seed=1).latents
    dcache.accelerate(pipe, policy="kv-rolling", sink_frames=2, window_frames=20)
    assert (pipe(emb, num_frames=9, seed=1).latents - ref).abs().max() < TOL
    dcache.accelerate(pipe, policy="kv-rolling", sink_frames=0, window_frames=1)
    assert (pipe(emb, num_frames=9, seed=1).latents - ref).abs().max() > 1e-3


def test_disable_restores_bitwise(pipe, emb, head_file):
    ref = pipe(emb, num_frames=6, seed=2).latents
    dcache.accelerate(pipe, policy="forcing-kv", head_file=head_file)
    pipe(emb, num_frames=6, seed=2)
    dcache.disable(pipe)
    assert torch.equal(pipe(emb, num_frames=6, seed=2).latents, ref)
    assert not hasattr(pipe, "dcache")


def test_euler_sampler_integrates_the_flow(pipe, emb):
    """sampler='euler': each chunk is x_noise + sum_i (sigma_{i+1} - sigma_i) v_i down to sigma 0, no fresh noise."""
    import dataclasses

    from dcache.pipelines.ar_video.pipeline import ARVideoConfig, sigmas_for

    with pytest.raises(ValueError, match="sampler must be one of"):
        ARVideoConfig(sampler="ddim")
    renoise = pipe(emb, num_frames=6, seed=3, decode=False).latents
    pipe.config = dataclasses.replace(pipe.config, sampler="euler")
    pipe.trace = []
    out = pipe(emb, num_frames=6, seed=3, decode=False).latents
    sig = sigmas_for(pipe.config.denoising_steps, pipe.config.shift) + [0.0]
    for c in range(2):
        steps = [t for t in pipe.trace if not t["commit"] and t["frame_start"] == 3 * c]
        assert [t["sigma"] for t in steps] == sig[:-1]
        x = steps[0]["x"] + sum((sig[i + 1] - sig[i]) * t["v"] for i, t in enumerate(steps))
        assert (x - out[:, :, 3 * c : 3 * c + 3]).abs().max() < 1e-5
        for i in range(1, len(steps)):  # deterministic: the next input is the previous Euler step
            assert (steps[i]["x"] - (steps[i - 1]["x"] + (sig[i] - sig[i - 1]) * steps[i - 1]["v"])).abs().max() < 1e-5
    assert not torch.allclose(out, renoise)
