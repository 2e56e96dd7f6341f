"""`dcache eval --model DIR` on a diffusers video pipeline (tiny random-init Wan 2.1, saved with its
text encoder and tokenizer): killed part-way and resumed, MP4 + lossless frames per sample,
per-frame fidelity checked against an independent computation from the stored files."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dcache.cli import main as cli

from .test_vbench import STAND_IN
from .video_pipes import save_cogvideox, save_ltx, save_wan

FRAMES, SIZE = 5, 16
PROMPTS = ["a red cat runs in the field", "a blue car drives on the road"]


def _args(model, out, extra=()):
    args = ["eval", "--model", str(model), "--policies", "static,teacache", "--num-samples", "4", "--steps", "8",
            "--threads", "1", "--num-frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE), *extra]
    for p in PROMPTS:
        args += ["--prompt", p]
    return args + ["--out", str(out)]


def _samples(out):
    recs = []
    if not os.path.exists(out / "manifest-0.jsonl"):
        return recs
    for line in open(out / "manifest-0.jsonl"):
        if line.endswith("\n"):
            r = json.loads(line)
            if r["kind"] == "sample":
                recs.append(r)
    return recs


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_wan(str(tmp_path_factory.mktemp("wan") / "tiny-wan"))


@pytest.fixture(scope="module")
def vbench_env(tmp_path_factory):
    """A stand-in VBench environment (tests/eval/test_vbench.py): temporal_flickering by VBench's formula."""
    root = tmp_path_factory.mktemp("vbench-env")
    (root / "vbench").mkdir()
    (root / "vbench" / "__init__.py").write_text(STAND_IN)
    exe = root / "python"
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={root} exec {sys.executable} \"$@\"\n")
    exe.chmod(0o755)
    return ["--vbench", "temporal_flickering", "--vbench-python", str(exe)]


@pytest.fixture(scope="module")
def resumed_run(wan_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalvideo") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, "-m", "dcache.cli", *_args(wan_dir, out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while len(_samples(out)) < 2:
        if p.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {p.stderr.read()[-2000:]}")
        if time.time() - t0 > 300:
            p.kill()
            pytest.fail("no samples in time")
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    first = _samples(out)
    assert 2 <= len(first) < 12, len(first)
    stamps = {r["file"]: os.stat(out / r["file"]).st_mtime_ns for r in first}
    assert cli(_args(wan_dir, out)) == 0
    return out, first, stamps, json.loads((out / "results.json").read_text())


def test_resume_keeps_every_video_and_generates_each_once(resumed_run):
    out, first, stamps, res = resumed_run
    recs = _samples(out)
    keys = [(r["config"], r["index"]) for r in recs]
    assert len(keys) == len(set(keys)) == 12
    assert {r["file"]: os.stat(out / r["file"]).st_mtime_ns for r in first} == stamps
    assert [r["label"] for r in res["rows"]] == ["baseline", "static", "teacache"]


def test_mp4_decodes_to_the_right_frames_and_size(resumed_run):
    import cv2

    out, _, _, _ = resumed_run
    for r in _samples(out):
        assert r["frames"] == FRAMES and r["fps"] == 16  # Wan's export frame rate
        cap = cv2.VideoCapture(str(out / r["video"]))
        frames = []
        while True:
            ok, fr = cap.read()
            if not ok:
                break
            frames.append(fr)
        assert len(frames) == FRAMES
        assert frames[0].shape == (SIZE * 4, SIZE * 4, 3)  # a 16-px video is enlarged x4 for players
        strip = np.asarray(Image.open(out / r["file"]))
        assert strip.shape == (SIZE, SIZE * FRAMES, 3)


def test_stored_baseline_is_what_the_pipeline_draws(resumed_run, wan_dir):
    from diffusers import DiffusionPipeline

    out, _, _, _ = resumed_run
    pipe = DiffusionPipeline.from_pretrained(wan_dir)
    pipe.set_progress_bar_config(disable=True)
    for r in _samples(out):
        if r["config"] != "baseline" or r["index"] > 1:
            continue
        v = pipe(prompt=[PROMPTS[r["index"] % 2]], num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=8,
                 generator=torch.Generator().manual_seed(r["seed"]), output_type="np").frames[0]  # (F, H, W, 3)
        want = np.clip(np.round(v * 255), 0, 255).astype(np.int16)
        got = np.asarray(Image.open(out / r["file"])).astype(np.int16).reshape(SIZE, FRAMES, SIZE, 3).transpose(1, 0, 2, 3)
        assert np.abs(got - want).max() <= 1  # rounding of float noise between two loads of the same weights


def test_per_frame_fidelity_and_costs_from_the_files(resumed_run):
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    out, _, _, res = resumed_run
    by = {(r["config"], r["index"]): r for r in _samples(out)}

    def frames(rec):  # (F, 3, H, W) in [0, 1] from the lossless strip
        a = np.asarray(Image.open(out / rec["file"])).astype(np.float64) / 255
        return a.reshape(SIZE, FRAMES, SIZE, 3).transpose(1, 3, 0, 2)

    base_row, *rows = res["rows"]
    assert base_row["computed_fraction"] == 1.0 and base_row["peak_mem_bytes"] > 0 and base_row["flops"] > 0
    for row in rows:
        per = []
        for f in range(FRAMES):
            vals = []
            for i in range(4):
                mse = np.mean((frames(by[(row["id"], i)])[f] - frames(by[("baseline", i)])[f]) ** 2)
                vals.append(100.0 if mse == 0 else 10 * math.log10(1 / mse))
            per.append(np.mean(vals) if any(v < 100 for v in vals) else "inf")
        assert len(row["psnr_per_frame"]) == FRAMES
        for g, w in zip(row["psnr_per_frame"], per):
            assert g == w if w == "inf" else g == pytest.approx(w, rel=1e-4)
        a = torch.from_numpy(np.stack([frames(by[(row["id"], i)]) for i in range(4)])).float()  # (N, F, 3, H, W)
        b = torch.from_numpy(np.stack([frames(by[("baseline", i)]) for i in range(4)])).float()
        assert row["ssim"] == pytest.approx(float(ssim(a.flatten(0, 1), b.flatten(0, 1), data_range=1.0, kernel_size=11)),
                                            rel=1e-4)
        assert row["ssim_per_frame"] == pytest.approx(
            [float(ssim(a[:, f], b[:, f], data_range=1.0, kernel_size=11)) for f in range(FRAMES)], rel=1e-4)
        assert row["lpips"] is None and row["flops"] > 0 and row["peak_mem_bytes"] > 0
        assert row["timed_pairs"] + len([1 for i in range(4) if by[(row["id"], i)]["session"] != by[("baseline", i)]["session"]]) == 4
    assert any("lpips omitted" in n for n in res["meta"]["notes"])
    # The ground of a speedup claim: the static cache computes less and its frames drift from the baseline's.
    static = rows[0]
    assert static["computed_fraction"] < 1.0 and static["psnr"] != "inf"
    assert (out / "grid.png").exists() and (out / "pareto.png").exists()


def test_frame_count_the_vae_cannot_decode_is_refused_before_sampling(wan_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(["eval", "--model", wan_dir, "--prompt", "a cat", "--num-frames", "6", "--steps", "2",
                "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == ("dcache eval: error: --num-frames 6: WanPipeline decodes k*4+1 frames "
                       "(its VAE compresses time by 4); use 5 or 9")
    assert not (out / "samples").exists()


@pytest.mark.slow  # VBench's driver process starts once per row (~10 s each on the busy 2-core machine)
def test_vbench_layout_and_scores_for_pipeline_videos(wan_dir, vbench_env, tmp_path):
    import cv2

    out = tmp_path / "vb"
    assert cli(_args(wan_dir, out, vbench_env)) == 0
    res = json.loads((out / "results.json").read_text())
    by = {(r["config"], r["index"]): r for r in _samples(out)}
    for row in res["rows"]:
        folder = out / "vbench" / "videos" / row["id"]
        # VBench's custom-input naming: <prompt>-<i>.mp4, i counting the videos of one prompt.
        names = sorted(os.listdir(folder))
        assert names == sorted(f"{p}-{k}.mp4" for p in PROMPTS for k in range(2))
        flicker = []
        for i in range(4):
            cap = cv2.VideoCapture(str(out / by[(row["id"], i)]["video"]))
            frames = []
            while True:
                ok, fr = cap.read()
                if not ok:
                    break
                frames.append(fr.astype(np.float64))
            flicker.append((255 - np.mean([np.abs(a - b).mean() for a, b in zip(frames[:-1], frames[1:])])) / 255)
        assert row["vbench_temporal_flickering"] == pytest.approx(float(np.mean(flicker)))


@pytest.mark.slow  # more pipeline families end to end (~30 s each on the busy 2-core machine)
@pytest.mark.parametrize("save, size, fps", [(save_cogvideox, 16, 8), (save_ltx, 32, 24)], ids=["cogvideox", "ltx"])
def test_other_video_pipelines_end_to_end(tmp_path, save, size, fps):
    import cv2

    model = save(str(tmp_path / "pipe"))
    out = tmp_path / "o"
    assert cli(["eval", "--model", model, "--prompt", "a dog jumps", "--policies", "static", "--num-samples", "2",
                "--steps", "6", "--num-frames", "9", "--height", str(size), "--width", str(size), "--threads", "1",
                "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    base, static = res["rows"]
    assert len(static["psnr_per_frame"]) == 9 and static["computed_fraction"] < 1.0
    for r in _samples(out):
        cap = cv2.VideoCapture(str(out / r["video"]))
        n = 0
        while cap.read()[0]:
            n += 1
        assert n == r["frames"] == 9 and r["fps"] == fps
