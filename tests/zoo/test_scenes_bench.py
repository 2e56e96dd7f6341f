"""`dcache bench` on the scenes model (its default): adherence column, interleaved timings, resume."""
import json

import pytest

from dcache.cli import main as cli
from dcache.eval import bench_image


def test_default_bench_is_scenes_with_adherence_and_interleaved_timings(tmp_path, monkeypatch):
    order = []
    timed = bench_image._time

    def spy(target, seeds, steps, before):
        order.append(len(order))
        return timed(target, seeds, steps, before)

    monkeypatch.setattr(bench_image, "_time", spy)
    out = tmp_path / "b"
    assert cli(["bench", "--steps", "4", "--num-samples", "3", "--repeats", "2", "--policies",
                "static(interval=2),static(interval=3)", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"] == "scenes" and meta["seeds"] == [0, 1, 2] and meta["timing_rounds"] == 2
    assert [r["label"] for r in rows] == ["baseline", "static(interval=2)", "static(interval=3)"]
    assert len(order) == 2 * 3  # two rounds over three configurations
    for r in rows:
        assert 0 <= r["adherence"] <= 1 and 0 <= r["attributes"] <= 1 and "class_accuracy" not in r
        assert r["timing_runs"] == 2 and r["wall_min"] <= r["wall_s"] <= r["wall_max"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["computed_fraction"] < 1

    # The adherence column is the checker's rate on the saved images of each row's seeds.
    import torch

    from dcache.pipelines.zoo.scenes import adherence_rate, check_adherence

    for r in rows:
        images = torch.load(out / "images" / f"{r['id']}.pt")
        results = check_adherence(images, bench_image.scene_prompts([0, 1, 2]))
        assert r["adherence"] == adherence_rate(results)
        n_checks = sum(2 + (r_["relation"] is not None) + 3 * len(r_["objects"]) for r_ in results)
        assert r["attributes"] * n_checks == pytest.approx(sum(
            r_["background"] + r_["count"] + bool(r_["relation"]) + sum(o["colour"] + o["shape"] + o["size"] for o in r_["objects"])
            for r_ in results))

    # --resume with one more policy: old rows keep their timings, the new row is timed beside the baseline.
    order.clear()
    assert cli(["bench", "--steps", "4", "--num-samples", "3", "--repeats", "2", "--resume", "--policies",
                "static(interval=2),static(interval=3),taylorseer(interval=2)", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert len(order) == 2 * 2
    assert again[1]["wall_s"] == rows[1]["wall_s"] and again[3]["label"] == "taylorseer(interval=2)"


def test_scene_prompts_are_per_seed_and_deterministic():
    assert bench_image.scene_prompts([0, 1, 2]) == bench_image.scene_prompts([0, 1, 2])
    assert bench_image.scene_prompts([5]) == bench_image.scene_prompts([4, 5])[1:]


def test_weights_dir_only_for_embedded_models(tmp_path, capsys):
    assert cli(["bench", "--model", str(tmp_path), "--weights-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--weights-dir applies to the embedded models" in capsys.readouterr().err
    assert cli(["bench", "--weights-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist; give an existing directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has no scenes_model.json"):
        bench_image.make_target(None, 4.0, "cpu", weights_dir=str(tmp_path))
