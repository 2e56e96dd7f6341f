"""The VBench adapter, up to and including VBench's results-file format.

VBench cannot run here (CUDA, pinned old transformers/numpy), so the user's "VBench environment"
is this interpreter with a stand-in ``vbench`` package that implements one dimension,
temporal_flickering, by VBench's documented formula and writes the results file VBench writes.
"""

import json
import os
import stat
import sys

import cv2
import numpy as np
import pytest
import torch

from dcache.eval import vbench
from dcache.eval.samples import save_mp4

STAND_IN = r'''
import json, os, re
import cv2
import numpy as np

class VBench:
    def __init__(self, device, full_info_json, output_dir):
        self.output_dir = output_dir

    def evaluate(self, videos_path, name, prompt_list=[], dimension_list=None, local=False, read_frame=False,
                 mode="vbench_standard", **kwargs):
        assert mode == "custom_input", mode
        mode_env = os.environ.get("STAND_IN_MODE", "")
        if mode_env == "crash":
            raise SystemExit(0)  # a failure that still exits 0, as `vbench evaluate` can
        per = []
        for f in sorted(os.listdir(videos_path)):
            cap = cv2.VideoCapture(os.path.join(videos_path, f))
            frames = []
            while True:
                ok, fr = cap.read()
                if not ok:
                    break
                frames.append(fr.astype(np.float64))
            diffs = [np.abs(a - b).mean() for a, b in zip(frames[:-1], frames[1:])]
            prompt = re.sub(r"-\d+$", "", os.path.splitext(f)[0])  # VBench's get_prompt_from_filename
            per.append({"video_path": os.path.join(videos_path, f), "video_results": (255 - np.mean(diffs)) / 255,
                        "prompt": prompt})
        res = {"temporal_flickering": [float(np.mean([p["video_results"] for p in per])), per]}
        with open(os.path.join(self.output_dir, name + "_eval_results.json"), "w") as fh:
            json.dump(res, fh)
        if mode_env == "exit1":
            raise SystemExit(1)
'''


@pytest.fixture
def vbench_python(tmp_path):
    pkg = tmp_path / "env" / "vbench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(STAND_IN)
    exe = tmp_path / "env" / "python"
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path / 'env'} exec {sys.executable} \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def _videos(tmp_path):
    g = torch.Generator().manual_seed(0)
    out = []
    for i, prompt in enumerate(["digit 4 moving (2, -1)", "digit 4 moving (2, -1)", "a/b -7"]):
        v = torch.rand(1, 6, 8, 8, generator=g) * (0.2 + 0.3 * i)
        path = tmp_path / f"s{i}.mp4"
        save_mp4(v, str(path))
        out.append((str(path), prompt))
    return out


def _flicker(path):
    cap = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, fr = cap.read()
        if not ok:
            break
        frames.append(fr.astype(np.float64))
    return (255 - np.mean([np.abs(a - b).mean() for a, b in zip(frames[:-1], frames[1:])])) / 255


def test_layout_run_and_results_file(tmp_path, vbench_python, monkeypatch):
    assert vbench.check_python(vbench_python) == vbench_python
    names = vbench.layout(_videos(tmp_path), str(tmp_path / "lay"))
    # VBench's naming: <prompt>-<index>.mp4, index per prompt; no '/' and no trailing "-<digits>" in a prompt.
    assert sorted(names) == ["a b  7-0.mp4", "digit 4 moving (2, -1)-0.mp4", "digit 4 moving (2, -1)-1.mp4"]
    scores = vbench.run(vbench_python, str(tmp_path / "lay"), ["temporal_flickering"], str(tmp_path / "res"), "row1")
    want = np.mean([_flicker(str(tmp_path / "lay" / n)) for n in sorted(names)])
    assert scores == {"temporal_flickering": pytest.approx(want)}
    data = json.load(open(tmp_path / "res" / "row1_eval_results.json"))
    assert {p["prompt"] for p in data["temporal_flickering"][1]} == {"digit 4 moving (2, -1)", "a b  7"}

    # Its exit status is not what counts: results + exit 1 is a result; exit 0 and no file is a failure.
    monkeypatch.setenv("STAND_IN_MODE", "exit1")
    assert vbench.run(vbench_python, str(tmp_path / "lay"), ["temporal_flickering"], str(tmp_path / "res"), "row1")
    monkeypatch.setenv("STAND_IN_MODE", "crash")
    with pytest.raises(RuntimeError, match="VBench wrote no row1_eval_results.json \\(exit status 0\\)"):
        vbench.run(vbench_python, str(tmp_path / "lay"), ["temporal_flickering"], str(tmp_path / "res"), "row1")
    with pytest.raises(RuntimeError, match="no score for 'motion_smoothness'"):
        monkeypatch.setenv("STAND_IN_MODE", "")
        vbench.run(vbench_python, str(tmp_path / "lay"), ["motion_smoothness"], str(tmp_path / "res"), "row1")


def test_setup_is_explained_when_vbench_is_missing(tmp_path):
    with pytest.raises(ValueError) as e:
        vbench.check_python(None)
    assert "--vbench-python" in str(e.value) and "pip install vbench" in str(e.value)
    with pytest.raises(ValueError, match="cannot import vbench"):
        vbench.check_python(sys.executable)
