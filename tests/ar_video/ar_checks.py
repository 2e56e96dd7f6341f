"""Shared assertions of the AR-video tests."""

import torch


def assert_cached_loop_equals_dense(pipe, emb, num_frames: int = 9, tol: float = 1e-4) -> None:
    """Every forward of a cached generation (commit and denoising passes) equals one dense forward
    over the same frames with the block-causal mask."""
    from dcache.pipelines.ar_video.pipeline import block_causal_frame_mask

    C = pipe.config.chunk_frames
    pipe.trace = []
    pipe(emb, num_frames=num_frames, seed=0)
    clean = torch.cat([t["x"] for t in pipe.trace if t["commit"]], 2)
    v_commit = torch.cat([t["v"] for t in pipe.trace if t["commit"]], 2)
    nf = clean.shape[2]
    v_dense = pipe.forward_dense(clean, torch.zeros(1, nf), emb, frame_mask=block_causal_frame_mask(nf, C))
    assert v_commit.abs().max() > 0.1
    assert (v_dense - v_commit).abs().max() < tol
    noisy = [t for t in pipe.trace if not t["commit"]]
    assert len(noisy) == (num_frames // C) * len(pipe.config.denoising_steps)
    for t in noisy:
        fs = t["frame_start"]
        x = torch.cat([clean[:, :, :fs], t["x"]], 2)
        sig = torch.cat([torch.zeros(1, fs), torch.full((1, C), t["sigma"])], 1)
        v = pipe.forward_dense(x, sig, emb, frame_mask=block_causal_frame_mask(fs + C, C))[:, :, fs:]
        assert (v - t["v"]).abs().max() < tol, (fs, t["sigma"])
