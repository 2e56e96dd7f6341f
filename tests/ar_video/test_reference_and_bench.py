"""Training forward == cached inference; reference data; the bench's output contract."""

import json
import os

import pytest
import torch

from dcache.pipelines.ar_video.reference import make_batch, prompt_embeds
from dcache.pipelines.ar_video.train_reference import teacher_forcing_mask


def test_teacher_forcing_forward_equals_cached_loop(pipe, emb):
    """The 2x-sequence training forward computes what the cached loop computes at sampling time."""
    pipe.trace = []
    pipe(emb, num_frames=9, seed=4)
    commits = [t for t in pipe.trace if t["commit"]]
    last_noisy = [t for t in pipe.trace if not t["commit"] and t["frame_start"] == 6]
    clean = torch.cat([t["x"] for t in commits] + [torch.zeros_like(commits[0]["x"])], 2)
    for step in range(4):
        noisy_t = [t for t in pipe.trace if not t["commit"]][step::4]  # step `step` of every chunk
        noisy = torch.cat([t["x"] for t in noisy_t], 2)
        sig = torch.cat([torch.zeros(1, 9), torch.tensor([[t["sigma"]] * 3 for t in noisy_t]).reshape(1, 9)], 1)
        pos = torch.arange(9)
        v = pipe.forward_dense(torch.cat([clean, noisy], 2), sig, emb, frame_positions=torch.cat([pos, pos]),
                               frame_mask=teacher_forcing_mask(9, 3))[:, :, 9:]
        want = torch.cat([t["v"] for t in noisy_t], 2)
        assert (v - want).abs().max() < 1e-4
    assert len(last_noisy) == 4


def test_data_and_prompts():
    lat, prompts, px = make_batch(2, 6, torch.Generator().manual_seed(0))
    assert lat.shape == (2, 4, 6, 12, 12) and px.shape == (2, 1, 6, 24, 24)
    assert lat.min() >= -1 and lat.max() <= 1 and px[:, :, 0].sum() > 0
    assert not torch.equal(px[:, :, 0], px[:, :, 1])  # the digit moves
    assert prompt_embeds(prompts).shape == (2, 3, 32)
    with pytest.raises(ValueError, match="vx, vy in"):
        prompt_embeds([(1, 3, 1)])


def test_bench_output_contract(tmp_path, head_file):
    from dcache.pipelines.ar_video.pipeline import ARVideoConfig, ARVideoPipeline
    from dcache.pipelines.ar_video.reference import build_transformer
    from dcache.eval.bench_ar_video import main

    tr = build_transformer(0)
    tr.config.num_layers  # noqa: B018
    model_dir = tmp_path / "m"
    ARVideoPipeline(tr, ARVideoConfig(pixel_shuffle=2, height=12, width=12)).save_pretrained(model_dir)
    from dcache.schedulers._forcing_heads import HeadSplit, save_head_file

    save_head_file(HeadSplit(4, 4, [[0, 1]] * 4, [[2, 3]] * 4), model_dir / "forcingkv_heads.json")
    out = tmp_path / "out"
    rc = main(["--model", str(model_dir), "--num-frames", "6", "--prompts", "1", "--repeats", "1", "--out", str(out),
               "--window-frames", "30"])
    assert rc == 0
    rows = json.load(open(os.path.join(out, "results.json")))
    assert [r["policy"] for r in rows] == ["kv-full", "kv-rolling", "forcing-kv"]
    for r in rows:
        for c in ("fps_denoise", "fps_end_to_end", "kv_bytes", "peak_mem_bytes", "psnr_vs_full", "speedup"):
            assert c in r
    full, roll, fkv = rows
    assert full["speedup"] == 1.0 and full["peak_mem_bytes"] > 0
    assert full["psnr_vs_full"] is None
    assert roll["psnr_vs_full"] is None or roll["psnr_vs_full"] > 80  # window covers everything
    assert fkv["kv_bytes"] < full["kv_bytes"] or fkv["kv_bytes"] == full["kv_bytes"] == 0
