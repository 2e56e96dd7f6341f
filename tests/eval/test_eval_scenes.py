"""`dcache eval --model scenes` (the default image model): seed s draws prompt s of the scenes
grammar (as `dcache bench` does), task accuracy is the scenes checker's adherence and attribute
rate, CLIP score with --clip-model; every number recomputed here from the stored PNGs."""

import json

import pytest
import torch

from dcache.cli import main as cli
from dcache.eval.samples import load_png

from .helpers import tiny_clip

SEEDS = [5, 6]


def test_scenes_eval_prompts_task_and_clip_from_the_files(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from dcache.eval.bench_image import attribute_rate
    from dcache.pipelines.zoo.scenes import check_adherence
    from dcache.pipelines.zoo.scenes.grammar import sample_prompts

    # a random CLIP whose cosines here are positive (seed 1: on the leg-4b to leg-7 scenes weights)
    clip = tiny_clip(str(tmp_path / "clip"), seed=1)
    out = tmp_path / "sc"
    assert cli(["eval", "--model", "scenes", "--policy", "static", "--steps", "4", "--seeds", "5,6", "--threads", "1",
                "--clip-model", clip, "--pareto-metric", "attributes", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    prompts = [sample_prompts(1, seed=s)[0] for s in SEEDS]
    assert json.loads((out / "config.json").read_text())["conditions"] == prompts
    recs = [json.loads(line) for line in open(out / "manifest-0.jsonl")]
    by = {(r["config"], r["index"]): r for r in recs if r["kind"] == "sample"}
    model = CLIPModel.from_pretrained(clip).eval()
    proc = CLIPProcessor.from_pretrained(clip)
    for row in res["rows"]:
        imgs = torch.stack([load_png(str(out / by[(row["id"], i)]["file"])) for i in range(2)])
        checks = check_adherence(imgs, prompts)
        assert row["task_metric"] == "prompt_adherence"
        assert row["task"] == pytest.approx(sum(c["whole"] for c in checks) / 2)
        assert row["attributes"] == pytest.approx(attribute_rate(checks))
        # CLIP score: max(mean of 100 x cosine(image, its prompt), 0) with the same CLIP, computed directly.
        u8 = imgs.clamp(0, 1).mul(255).round().to(torch.uint8)
        with torch.no_grad():
            batch = proc(text=prompts, images=list(u8), return_tensors="pt", padding=True)
            img = model.get_image_features(pixel_values=batch["pixel_values"])
            txt = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = torch.nn.functional.cosine_similarity(img, txt)
        want = max(float((100 * cos).mean()), 0.0)
        assert want > 0 and row["clip_score"] == pytest.approx(want, rel=1e-3)
    header = (out / "results.md").read_text().splitlines()[0]
    assert "attributes" in header and "clip" in header and "task" in header


def test_no_model_means_the_scenes_model(tmp_path):
    from dcache.pipelines.zoo.scenes.grammar import sample_prompts

    out = tmp_path / "default"
    assert cli(["eval", "--policy", "static", "--steps", "2", "--seeds", "3", "--threads", "1", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["conditions"] == sample_prompts(1, seed=3)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["task_metric"] for r in rows} == {"prompt_adherence"}
