"""Training forward == cached inference; reference data; the bench's output contract."""

import json
import os

import pytest
import torch

from dcache.pipelines.ar_video.reference import make_batch, prompt_embeds
from dcache.pipelines.ar_video.train_reference import corrupt_context, gapped_frames, history_window_mask, teacher_forcing_mask


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


def test_windowed_training_forward_equals_rolling_cache(pipe, emb):
    """The history-window training mask is exactly what kv-rolling (sink 1, window W) shows the model."""
    import dcache

    nf, C, W = 12, 3, 3
    dcache.accelerate(pipe, policy="kv-rolling", sink_frames=1, window_frames=W)
    pipe.trace = []
    pipe(emb, num_frames=nf, seed=5)
    commits = [t for t in pipe.trace if t["commit"]]
    clean = torch.cat([t["x"] for t in commits] + [torch.zeros_like(commits[0]["x"])], 2)
    mask = history_window_mask(teacher_forcing_mask(nf, C), nf, C, torch.tensor([W]))
    assert mask.shape == (1, 2 * nf, 2 * nf)
    for step in (0, 3):
        noisy_t = [t for t in pipe.trace if not t["commit"]][step::4]
        noisy = torch.cat([t["x"] for t in noisy_t], 2)
        sig = torch.cat([torch.zeros(1, nf), torch.tensor([[t["sigma"]] * C for t in noisy_t]).reshape(1, nf)], 1)
        pos = torch.arange(nf)
        v = pipe.forward_dense(torch.cat([clean, noisy], 2), sig, emb, frame_positions=torch.cat([pos, pos]), frame_mask=mask)[:, :, nf:]
        want = torch.cat([t["v"] for t in noisy_t], 2)
        assert (v - want).abs().max() < 1e-4
        # and the cut matters: the full-history mask gives a different answer for the last chunks
        v_full = pipe.forward_dense(torch.cat([clean, noisy], 2), sig, emb, frame_positions=torch.cat([pos, pos]),
                                    frame_mask=teacher_forcing_mask(nf, C))[:, :, nf:]
        assert (v_full[:, :, 9:] - want[:, :, 9:]).abs().max() > 1e-3
    dcache.disable(pipe)


def test_training_sequence_helpers():
    m = teacher_forcing_mask(6, 3)
    assert torch.equal(history_window_mask(m, 6, 3, torch.tensor([0]))[0], m)  # window 0 = no cut
    w1 = history_window_mask(m, 6, 3, torch.tensor([1]))[0]
    assert w1[3, :3].tolist() == [True, False, True]  # chunk 1 keeps the sink and the newest frame
    assert w1[9, :3].tolist() == [True, False, True] and w1[9, 9:].all()  # noisy rows too; own noisy chunk kept
    assert gapped_frames(9, 3, 1).tolist() == list(range(9))
    assert gapped_frames(9, 3, 5).tolist() == [0, 1, 2, 15, 16, 17, 18, 19, 20]
    lat, _, _ = make_batch(3, 6, torch.Generator().manual_seed(1))
    assert torch.equal(corrupt_context(lat, torch.Generator().manual_seed(0), prob=0.0), lat)
    bad = corrupt_context(lat, torch.Generator().manual_seed(0), prob=1.0)
    assert bad.shape == lat.shape and (bad - lat).abs().mean() > 0.01


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
               "--window-frames", "30"])  # a model without world.json: the legacy three rows
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


def test_bench_equal_memory_rows_share_seeds_and_budgets(tmp_path, capsys):
    """On an occlusion-world model dir the default rows are the equal-memory comparison; rows
    whose retained tokens are the same by construction give identical frames (same seeds, same
    given chunk), and the byte budgets match where they should."""
    from dcache.eval.bench_ar_video import main
    from dcache.pipelines.ar_video.pipeline import ARVideoConfig, ARVideoPipeline
    from dcache.pipelines.ar_video.reference import build_transformer
    from dcache.schedulers._forcing_heads import HeadSplit, save_head_file

    model_dir = tmp_path / "m"
    ARVideoPipeline(build_transformer(0), ARVideoConfig(pixel_shuffle=2, height=12, width=12)).save_pretrained(model_dir)
    save_head_file(HeadSplit(4, 4, [[0, 1]] * 4, [[2, 3]] * 4), model_dir / "forcingkv_heads.json")
    (model_dir / "world.json").write_text('{"world": "occlusion"}')
    out = tmp_path / "out"
    twin = "forcing-kv(static_ctx_frames=2,dynamic_ring_frames=2,dynamic_budget_frames=0)"  # = kv-rolling(window_frames=2)
    from dcache.eval.bench_ar_video import DEFAULT_POLICIES

    rc = main(["--model", str(model_dir), "--num-frames", "12", "--prompts", "2", "--repeats", "1", "--no-memory",
               "--out", str(out), "--policies", DEFAULT_POLICIES + "," + twin])
    assert rc == 0
    rows = {r["label"]: r for r in json.load(open(os.path.join(out, "results.json")))}
    assert list(rows)[0] == "kv-full" and len(rows) == 12
    by = {k: rows[k]["kv_bytes"] for k in rows}
    assert by["kv-rolling(window_frames=2)"] == by["forcing-kv(static_ctx_frames=2)"] == by[twin] \
        == by["forcing-kv(static_ctx_frames=2,selection='random')"]
    assert by["forcing-kv"] == by["forcing-kv(dynamic_ring_frames=2,dynamic_budget_frames=0)"] == by["forcing-kv(selection='random')"]
    assert by["kv-rolling(window_frames=1)"] < by["forcing-kv"] < by["kv-rolling(window_frames=2)"] < by["kv-full"]
    a, b = rows["kv-rolling(window_frames=2)"], rows[twin]
    for key in ("psnr_vs_full", "psnr_vs_full_mean", "psnr_vs_gt", "psnr_vs_gt_mean", "psnr_vs_gt_per_chunk"):
        assert a[key] == b[key]
    assert a["psnr_vs_full"] is not None  # it did drop history (else the equality says nothing)
    assert rows["kv-full"]["attn_mass_kept"] == 1.0 and rows["kv-full"]["given_frames"] == 3
    assert 0 < rows["kv-rolling(window_frames=1)"]["attn_mass_kept"] < rows["kv-rolling(window_frames=2)"]["attn_mass_kept"] < 1
    assert all(r["psnr_vs_gt"] is not None for r in rows.values())
    assert os.path.exists(os.path.join(out, "results.md"))
    # bad input: one line, non-zero exit, before any generation
    assert main(["--model", str(model_dir), "--policies", "kv-rolling(window=2)", "--out", str(out)]) == 2
    assert "window" in capsys.readouterr().err
