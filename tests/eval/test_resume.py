"""Kill `dcache eval` mid-run, start it again: nothing finished is regenerated or lost."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dcache.cli import main as cli
from dcache.eval.samples import SampleStore

ARGS = ["eval", "--model", "digits", "--steps", "3", "--num-samples", "4", "--threads", "1",
        "--policy", "static(interval=2),taylorseer(interval=2,warmup_steps=1)"]


def _samples(out):
    recs = []
    for name in sorted(os.listdir(out)):
        if name.startswith("manifest-"):
            for line in open(out / name):
                if line.endswith("\n"):
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if r["kind"] == "sample":
                        recs.append(r)
    return recs


def _start(out):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "dcache.cli"] + ARGS + ["--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(out, proc, count, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (out / "samples").exists() and len(_samples(out)) >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("run did not produce samples in time")


def _stamp(out, recs):
    return {r["file"]: (os.stat(out / r["file"]).st_ino, os.stat(out / r["file"]).st_mtime_ns) for r in recs}


@pytest.fixture
def terminal_sigint():
    """SIGINT as in a terminal (Python's KeyboardInterrupt handler). A shell that starts the suite in
    the background (``pytest ... &``) hands the process SIGINT ignored, and the Ctrl-C below would
    then never arrive (the run would finish with exit 0)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_kill_resume_interrupt_keeps_every_sample(tmp_path, capsys, terminal_sigint):
    out = tmp_path / "run"
    # 1. SIGKILL part-way (a separate process): no chance to clean up.
    p = _start(out)
    _wait_for(out, p, 3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    first = _samples(out)
    assert 3 <= len(first) < 12
    stamps = _stamp(out, first)

    # 2. Resume in-process, then a real Ctrl-C (SIGINT to this process) part-way: one line, exit 130.
    fired, stop = threading.Event(), threading.Event()

    def press_ctrl_c():
        while not stop.is_set():
            if len(_samples(out)) >= len(first) + 2:
                fired.set()
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=press_ctrl_c, daemon=True)
    watcher.start()
    capsys.readouterr()
    try:
        rc = cli(ARGS + ["--out", str(out)])
    finally:
        stop.set()
        watcher.join()
    assert fired.is_set() and rc == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"dcache eval: error: interrupted; finished samples are kept in {out} (run the same command again to resume)")
    second = _samples(out)
    assert len(first) + 2 <= len(second) < 12
    assert _stamp(out, first) == stamps  # finished files untouched (same inode, same mtime)

    # 3. Resume to the end in-process.
    assert cli(ARGS + ["--out", str(out)]) == 0
    recs = _samples(out)
    keys = [(r["config"], r["index"]) for r in recs]
    assert len(keys) == len(set(keys)) == 12  # each sample generated exactly once over three runs
    assert _stamp(out, first) == stamps
    assert {r["config"] for r in recs} == {"baseline", "static_interval=2-75f97a",
                                           "taylorseer_interval=2_warmup_steps=1-" +
                                           json.loads((out / "config.json").read_text())["configs"][2]["id"][-6:]}

    # The stored baseline samples are exactly what the pipeline draws for their seeds.
    from dcache.pipelines.zoo.reference import load_reference_pipeline

    pipe = load_reference_pipeline()
    for r in recs:
        if r["config"] != "baseline":
            continue
        img = pipe(class_labels=[r["index"] % 10], num_inference_steps=3, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(r["seed"]), output_type="np").images[0]
        want = np.clip(np.round(img[..., 0] * 255), 0, 255).astype(np.uint8)
        assert np.array_equal(np.asarray(Image.open(out / r["file"])), want)

    # Speedups only pair samples timed in one session; pairs split by a kill are left out.
    rows = {r["id"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    by = {(r["config"], r["index"]): r for r in recs}
    for cid, row in rows.items():
        if cid == "baseline":
            continue
        same = [i for i in range(4) if by[(cid, i)]["session"] == by[("baseline", i)]["session"]]
        assert row["timed_pairs"] == len(same)
        if same:
            want = sum(by[("baseline", i)]["wall_s"] for i in same) / sum(by[(cid, i)]["wall_s"] for i in same)
            assert row["speedup"] == pytest.approx(want)
        else:
            assert row["speedup"] is None and "same session" in row["timing_note"]
        if len(same) < 4:
            assert "timing_note" in row

    # A different configuration in the same --out is refused, before generating anything.
    capsys.readouterr()
    assert cli(["eval", "--model", "digits", "--steps", "4", "--num-samples", "4", "--threads", "1", "--policy",
                "static(interval=2),taylorseer(interval=2,warmup_steps=1)", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dcache eval: error: --out") and "different configuration (steps differ)" in err
    assert len(_samples(out)) == 12


def test_torn_manifest_line_is_ignored_and_stays_separate(tmp_path):
    store = SampleStore(str(tmp_path), {"a": 1})
    store.add_sample("baseline", 0, 0, torch.zeros(1, 4, 4))
    with open(tmp_path / "manifest-0.jsonl", "a") as f:
        f.write('{"kind": "sample", "config": "baseline", "ind')  # killed mid-line
    again = SampleStore(str(tmp_path), {"a": 1})
    again.add_sample("baseline", 1, 1, torch.ones(1, 4, 4))
    assert sorted(again.finished()) == [("baseline", 0), ("baseline", 1)]
    assert torch.equal(again.image(again.finished()[("baseline", 1)]), torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="different configuration"):
        SampleStore(str(tmp_path), {"a": 2})
