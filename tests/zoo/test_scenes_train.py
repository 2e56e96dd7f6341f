"""The scenes training script: a continued run starts from the given weights; bad --init is refused."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from dcache.pipelines.zoo.scenes.loader import WEIGHTS_DIR, load_scenes_pipeline
from dcache.pipelines.zoo.scenes.model import TRANSFORMER_FILE
from dcache.pipelines.zoo.scenes.train import main

TINY_RUN = ["--steps", "1", "--batch-size", "2", "--warmup", "1", "--eval-samples", "1", "--eval-steps", "1",
            "--log-every", "1"]


def test_init_continues_from_the_given_weights(tmp_path):
    torch.set_num_threads(1)
    # A learning rate of ~0 leaves the weights where --init put them (up to float16 rounding), so
    # the checkpoint must match the shipped one; a run that ignored --init would hold fresh weights.
    assert main(["--out", str(tmp_path), "--init", str(WEIGHTS_DIR), "--lr", "1e-12", *TINY_RUN]) == 0
    shipped, resumed = load_file(str(WEIGHTS_DIR / TRANSFORMER_FILE)), load_file(str(tmp_path / TRANSFORMER_FILE))
    assert shipped.keys() == resumed.keys()
    worst = max((shipped[k].float() - resumed[k].float()).abs().max().item() for k in shipped)
    assert worst < 1e-2, worst
    meta = json.loads((tmp_path / "scenes_model.json").read_text())["training"]
    assert meta["init"] == str(WEIGHTS_DIR) and meta["steps_done"] == 1
    assert meta["init_training"]["steps_done"] > 0  # the first leg's record travels with the checkpoint
    pipe = load_scenes_pipeline(weights_dir=tmp_path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a big red circle on a black background", num_inference_steps=1, output_type="pt").images
    assert out.shape == (1, 3, 32, 32)


def test_fresh_run_differs_from_the_shipped_weights(tmp_path):
    """The ground of the test above: without --init the same tiny run is far from the shipped weights."""
    torch.set_num_threads(1)
    assert main(["--out", str(tmp_path), "--lr", "1e-12", *TINY_RUN]) == 0
    shipped, fresh = load_file(str(WEIGHTS_DIR / TRANSFORMER_FILE)), load_file(str(tmp_path / TRANSFORMER_FILE))
    assert max((shipped[k].float() - fresh[k].float()).abs().max().item() for k in shipped) > 0.1


def test_init_without_weights_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "out"), "--init", str(tmp_path), *TINY_RUN])
    assert "lacks scenes_model.json" in str(e.value) and "\n" not in str(e.value)
