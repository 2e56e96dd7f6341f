"""`dcache eval --task ar-video`: MP4 + lossless frames per sample, per-frame fidelity."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from dcache.cli import main as cli


@pytest.mark.slow  # the AR-video reference at 9 frames x 2 samples x 2 rows: ~50 s on a busy 2-core machine
def test_ar_video_eval_writes_mp4_and_scores_every_frame(tmp_path):
    import cv2

    out = tmp_path / "v"
    assert cli(["eval", "--task", "ar-video", "--num-frames", "9", "--num-samples", "2", "--threads", "1",
                "--policy", "kv-rolling(window_frames=3)", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    base, roll = res["rows"]
    assert base["policy"] == "kv-full" and roll["policy"] == "kv-rolling"
    recs = {}
    for line in open(out / "manifest-0.jsonl"):
        r = json.loads(line)
        if r["kind"] == "sample":
            recs[(r["config"], r["index"])] = r
    for r in recs.values():
        cap = cv2.VideoCapture(str(out / r["video"]))
        n = 0
        while cap.read()[0]:
            n += 1
        assert n == 9 == r["frames"]
    # Per-frame PSNR, averaged over the two videos, from the lossless strips (frames side by side).
    def frames(rec):
        a = np.asarray(Image.open(out / rec["file"])).astype(np.float64) / 255
        return a.reshape(a.shape[0], 9, -1).transpose(1, 0, 2)  # (F, H, W)

    per = []
    for f in range(9):
        vals = []
        for i in range(2):
            mse = np.mean((frames(recs[(roll["id"], i)])[f] - frames(recs[("baseline", i)])[f]) ** 2)
            vals.append(100.0 if mse == 0 else 10 * math.log10(1 / mse))
        per.append(np.mean(vals) if any(v < 100 for v in vals) else "inf")
    got = roll["psnr_per_frame"]
    assert len(got) == 9
    for g, w in zip(got, per):
        assert g == w if w == "inf" else g == pytest.approx(w, rel=1e-4)
    # A window of 3 frames must lose something by the last frames; the first chunk is exact.
    assert got[0] == "inf" and got[-1] != "inf"
    assert (out / "grid.png").exists() and (out / "pareto.png").exists()
