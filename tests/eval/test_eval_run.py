"""`dcache eval` end to end on the embedded digits model: rows checked against the files on disk."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dcache.cli import main as cli


SWEEP = ["eval", "--model", "digits", "--steps", "4", "--num-samples", "3", "--threads", "1", "--policy", "static",
         "--sweep", "static.interval=2,4"]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "sweep"
    rc = cli(SWEEP + ["--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def _png(path):
    return np.asarray(Image.open(path)).astype(np.float64) / 255.0


def _manifest(out):
    recs = [json.loads(line) for line in open(out / "manifest-0.jsonl")]
    return {(r["config"], r["index"]): r for r in recs if r["kind"] == "sample"}


def test_rows_match_an_independent_computation_from_the_files(sweep_run):
    out, res = sweep_run
    rows = res["rows"]
    assert [r["label"] for r in rows] == ["baseline", "static(interval=2)", "static(interval=4)"]
    recs = _manifest(out)
    from dcache.pipelines.zoo.digit_classifier import load_digit_classifier

    clf = load_digit_classifier()
    for row in rows:
        mine = [recs[(row["id"], i)] for i in range(3)]
        base = [recs[("baseline", i)] for i in range(3)]
        # PSNR: mean over samples of 10 log10(1 / MSE), straight from the PNG bytes.
        mses = [np.mean((_png(out / a["file"]) - _png(out / b["file"])) ** 2) for a, b in zip(mine, base)]
        if row["id"] == "baseline":
            assert row["psnr"] == "inf" and row["ssim"] == pytest.approx(1.0) and row["speedup"] == 1.0
        else:
            assert row["psnr"] == pytest.approx(np.mean([10 * math.log10(1 / m) for m in mses]), rel=1e-4)
            assert 0 < row["ssim"] < 1
            want = sum(b["wall_s"] for b in base) / sum(a["wall_s"] for a in mine)
            assert row["speedup"] == pytest.approx(want) and row["timed_pairs"] == 3
        # task accuracy: the digit classifier on the stored files, against the requested classes.
        imgs = torch.stack([torch.from_numpy(_png(out / a["file"])).float()[None] for a in mine])
        assert row["task"] == pytest.approx(float((clf.score(imgs) == torch.tensor([0, 1, 2])).float().mean()))
        assert row["wall_s"] == pytest.approx(float(np.median([a["wall_s"] for a in mine])))
        assert row["peak_mem_bytes"] > 0 and row["flops"] > 0


def test_quality_measure_moves_with_the_setting(sweep_run):
    # The ground of every "equal quality" claim: computing fewer steps must cost fidelity here.
    _, res = sweep_run
    base, s2, s4 = res["rows"]
    assert base["computed_fraction"] == 1.0
    assert s4["computed_fraction"] < s2["computed_fraction"] < 1.0
    assert s4["psnr"] < s2["psnr"] and s4["ssim"] < s2["ssim"]


def test_csv_md_grid_and_pareto(sweep_run):
    out, res = sweep_run
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["id"] for r in table] == [r["id"] for r in res["rows"]]
    assert float(table[1]["psnr"]) == pytest.approx(res["rows"][1]["psnr"])
    assert json.loads(table[1]["options"]) == {"interval": 2}
    assert "static(interval=4)" in (out / "results.md").read_text()
    grid = Image.open(out / "grid.png")
    # 3 columns of 96 px tiles; rows: baseline, 2 configs, and a difference map under each config.
    assert grid.size == (190 + 3 * 99, 18 + 5 * 99)
    arr = np.asarray(grid.convert("L")).astype(float)
    recs = _manifest(out)
    a = _png(out / recs[(res["rows"][2]["id"], 0)]["file"])
    b = _png(out / recs[("baseline", 0)]["file"])
    want = np.clip(np.abs(a - b) * 4, 0, 1)[0, 0] * 255  # top-left pixel of the last diff map
    assert arr[18 + 4 * 99, 190] == pytest.approx(want, abs=1.5)
    assert Image.open(out / "pareto.png").size[0] > 0


def test_frontier_and_label_placement():
    from dcache.eval import pareto

    rows = [{"speedup": 1.0, "psnr": 40.0}, {"speedup": 2.0, "psnr": 30.0}, {"speedup": 1.5, "psnr": 25.0},
            {"speedup": 3.0, "psnr": 20.0}, {"speedup": 2.0, "psnr": None}]
    assert pareto.frontier(rows, "psnr") == [0, 1, 3]  # (1.5, 25) is beaten by (2, 30)
    assert pareto.frontier([{"speedup": 2, "lpips": 0.1}, {"speedup": 2, "lpips": 0.2}], "lpips") == [0]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    pts = [(1 + 0.01 * i, 20 + 0.01 * i, f"taylorseer(interval={i})") for i in range(6)]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    ax.margins(0.5)
    texts = pareto._place_labels(fig, ax, pts)
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in texts]
    assert len(boxes) == 6
    for i in range(6):
        for j in range(i + 1, 6):
            assert not boxes[i].overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    plt.close(fig)


@pytest.mark.slow  # cache-dit's import and MagCache's calibration run: ~40 s on a busy 2-core machine
def test_peers_are_rows_scored_on_their_own_outputs(tmp_path):
    out = tmp_path / "peers"
    assert cli(["eval", "--model", "digits", "--steps", "4", "--num-samples", "1", "--threads", "1",
                "--policy", "fbcache", "--peers", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {(r["source"], r["policy"]): r for r in res["rows"]}
    assert {"baseline", "dcache", "diffusers"} <= {s for s, _ in rows}
    assert ("cache-dit", "DBCache") in rows or any("cache-dit" in n for n in res["meta"]["notes"])
    ts = rows[("diffusers", "TaylorSeerCache")]
    assert ts["computed_fraction"] < 1  # diffusers' hook really skipped work at these settings
    # The row's sample is what diffusers' own TaylorSeerCache hook draws for that seed.
    from diffusers import TaylorSeerCacheConfig

    from dcache.pipelines.zoo.reference import load_reference_pipeline

    pipe = load_reference_pipeline()
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=6, disable_cache_before_step=3, max_order=1,
                                                        taylor_factors_dtype=torch.float32))
    img = pipe(class_labels=[0], num_inference_steps=4, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
               output_type="np").images[0]
    want = np.clip(np.round(img[..., 0] * 255), 0, 255).astype(np.uint8)
    recs = _manifest(out)
    assert np.array_equal(np.asarray(Image.open(out / recs[(ts["id"], 0)]["file"])), want)


@pytest.mark.slow  # two fresh processes under accelerate launch: ~40 s on a busy 2-core machine
def test_two_processes_under_accelerate_equal_one(sweep_run, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    one, res1 = sweep_run
    out = tmp_path / "two"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "dcache.cli"] + SWEEP + ["--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = {}
    for r in (0, 1):
        recs = [json.loads(line) for line in open(out / f"manifest-{r}.jsonl")]
        ranks[r] = sorted({x["index"] for x in recs if x["kind"] == "sample"})
    assert ranks == {0: [0, 1], 1: [2]}  # contiguous shares, the first rank one more
    res2 = json.loads((out / "results.json").read_text())
    for a, b in zip(res1["rows"], res2["rows"]):
        assert a["id"] == b["id"]
        for k in ("psnr", "ssim", "task", "flops", "computed_fraction", "samples"):
            assert a[k] == b[k], k
    for (cid, i), rec in _manifest(one).items():
        assert (one / rec["file"]).read_bytes() == (out / rec["file"]).read_bytes()
