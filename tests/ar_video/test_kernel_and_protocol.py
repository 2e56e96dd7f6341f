"""Triton head gather/scatter vs the torch reference, and the dcache accelerate protocol."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dcache
from dcache.kernels.kv_gather import gather_heads_ref, scatter_heads_ref


def test_triton_kernel_matches_reference_interpreted():
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch
        from dcache.kernels.kv_gather import gather_heads, gather_heads_ref, scatter_heads, scatter_heads_ref, gather_heads_into
        x = torch.randn(2, 5, 37, 12)
        h = torch.tensor([4, 0, 2])
        assert torch.equal(gather_heads(x, h), gather_heads_ref(x, h))
        out = torch.zeros(2, 5, 37, 12); ref = torch.zeros(2, 5, 37, 12)
        src = torch.randn(2, 3, 37, 12)
        scatter_heads(out, src, h); scatter_heads_ref(ref, src, h)
        assert torch.equal(out, ref)
        dst = torch.zeros(2, 3, 50, 12)
        gather_heads_into(dst, x, h)
        assert torch.equal(dst[:, :, :37], x[:, [4, 0, 2]]) and dst[:, :, 37:].abs().sum() == 0
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1", DCACHE_FORCE_TRITON="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_reference_gather_scatter():
    x = torch.randn(1, 4, 3, 2)
    h = torch.tensor([3, 1])
    assert torch.equal(gather_heads_ref(x, h), x[:, [3, 1]])
    out = torch.zeros_like(x)
    scatter_heads_ref(out, x[:, [3, 1]], h)
    assert torch.equal(out[:, [3, 1]], x[:, [3, 1]]) and out[:, [0, 2]].abs().sum() == 0


def test_protocol_stats_reset_and_errors(pipe, emb, head_file):
    assert pipe._dcache_task == "ar-video"
    dcache.accelerate(pipe, policy="forcing-kv", head_file=head_file)
    pipe(emb, num_frames=9, seed=0)
    assert pipe.ctx.cache is None and not pipe.ctx.cross_cache  # nothing cached survives the run
    assert not any(torch.is_tensor(v) for v in pipe._last_stats.values())
    s = pipe.dcache.stats()
    assert s["policy"] == "forcing-kv" and s["kv_bytes"] > 0 and s["fps_denoise"] > 0
    assert s["static_heads"] == 3 and s["dynamic_heads"] == 5
    dcache.accelerate(pipe, policy="kv-full")
    pipe(emb, num_frames=9, seed=0)
    assert pipe.dcache.stats()["kv_bytes"] > s["kv_bytes"]
    assert s["mean_keys_per_head"] < pipe.dcache.stats()["mean_keys_per_head"]
    pipe.dcache.reset()
    assert "kv_bytes" not in pipe.dcache.stats()
    with pytest.raises(ValueError, match="kv-rolling"):
        dcache.accelerate(pipe, policy="no-such-policy")
    with pytest.raises(ValueError, match="multiple of chunk_frames"):
        pipe(emb, num_frames=7)
    with pytest.raises(ValueError, match="window_frames"):
        dcache.accelerate(pipe, policy="kv-rolling", window_frames=0)
    assert set(dcache.policies("ar-video")) >= {"kv-full", "kv-rolling", "forcing-kv"}


def test_contiguous_head_groups_use_views_with_equal_results():
    from dcache.kernels.kv_gather import as_head_index, gather_heads, gather_heads_into, scatter_heads

    assert as_head_index(torch.tensor([2, 3, 4])) == slice(2, 5)
    assert isinstance(as_head_index(torch.tensor([0, 2])), torch.Tensor)
    assert as_head_index(None) is None
    x = torch.randn(2, 6, 5, 4)
    for heads in ([1, 2, 3], [0, 4]):
        h = torch.tensor(heads)
        idx = as_head_index(h)
        assert torch.equal(gather_heads(x, idx), x[:, heads])
        dst = torch.zeros(2, len(heads), 9, 4)
        gather_heads_into(dst, x, idx)
        assert torch.equal(dst[:, :, :5], x[:, heads]) and not dst[:, :, 5:].any()
        out = torch.zeros_like(x)
        scatter_heads(out, x[:, heads] * 2, idx)
        assert torch.equal(out[:, heads], 2 * x[:, heads])
        others = [i for i in range(6) if i not in heads]
        assert not out[:, others].any()
