"""`dcache bench` end to end on small settings: output files, rows, resume, bad input."""

import json
import os

import pytest
import torch

from dcache.cli import main as cli
from dcache.eval.bench_image import parse_policies


def test_parse_policies():
    assert parse_policies("static,taylorseer(interval=4, order=2),fbcache(threshold=0.1)") == [
        ("static", {}), ("taylorseer", {"interval": 4, "order": 2}), ("fbcache", {"threshold": 0.1})]
    with pytest.raises(ValueError, match="unknown policy 'nope'; accepted:"):
        parse_policies("static,nope")
    with pytest.raises(ValueError, match="bad option"):
        parse_policies("static(3)")


def test_bench_embedded_model_writes_results(tmp_path, capsys):
    out = tmp_path / "b"
    rc = cli(["bench", "--model", "digits", "--steps", "4", "--num-samples", "2", "--repeats", "1", "--policies", "static(interval=2),taylorseer(interval=2,warmup_steps=1)",
              "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["policy"] for r in rows] == ["baseline", "static", "taylorseer"]
    for r in rows:
        for key in ("policy", "options", "wall_s", "speedup", "computed_fraction", "psnr", "ssim", "class_accuracy"):
            assert key in r
    assert rows[0]["speedup"] == 1.0 and rows[0]["computed_fraction"] == 1.0
    for r in rows[1:]:
        assert 0 < r["computed_fraction"] < 1  # both skip work at these settings
        assert r["psnr"] > 5 and 0 <= r["class_accuracy"] <= 1
    assert (out / "grid.png").stat().st_size > 0 and (out / "pareto.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "computed" in printed and "taylorseer" in printed and "lpips omitted" in printed

    # --resume reuses the finished rows instead of recomputing them.
    before = (out / "results.json").read_text()
    assert cli(["bench", "--model", "digits", "--steps", "4", "--num-samples", "2", "--resume", "--out", str(out),
                "--policies", "static(interval=2),taylorseer(interval=2,warmup_steps=1)"]) == 0
    after = json.loads((out / "results.json").read_text())
    assert [r["wall_s"] for r in after] == [r["wall_s"] for r in json.loads(before)]


def test_bench_local_pipeline_directory(tmp_path, tiny_pipes):
    pipe = tiny_pipes("dit")[0]
    pipe.save_pretrained(tmp_path / "dit")
    out = tmp_path / "b"
    assert cli(["bench", "--model", str(tmp_path / "dit"), "--steps", "4", "--num-samples", "2",
                "--policies", "static(interval=2)", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert rows[1]["policy"] == "static" and "class_accuracy" not in rows[1]
    assert rows[1]["computed_fraction"] < 1


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    # One line and exit code 2, before anything runs (the full table is tests/eval/test_cli_errors.py).
    assert cli(["bench", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "--steps must be at least 2" in capsys.readouterr().err
    assert cli(["bench", "--policies", "bogus", "--out", str(tmp_path)]) == 2
    assert "unknown policy 'bogus'" in capsys.readouterr().err
    assert cli(["bench", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_bench_peers_rows_are_marked_with_their_source(tmp_path):
    out = tmp_path / "p"
    assert cli(["bench", "--model", "digits", "--steps", "4", "--num-samples", "1", "--policies", "fbcache", "--peers",
                "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    sources = {r["source"] for r in rows}
    assert {"baseline", "dcache", "diffusers"} <= sources
    names = {(r["source"], r["policy"]) for r in rows}
    cache_dit_ran = ("cache-dit", "DBCache") in names
    assert cache_dit_ran or any("cache-dit" in n for n in meta["notes"])
    for r in rows:
        assert r["psnr"] is not None and r["computed_fraction"] > 0
