"""The training script writes a checkpoint that the loader reads back."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from dcache.pipelines.zoo import DigitsModelConfig, load_reference_pipeline
from dcache.pipelines.zoo.train_digits import main


def test_two_steps_write_a_loadable_checkpoint(tmp_path):
    assert main(["--out", str(tmp_path), "--steps", "2", "--batch-size", "2", "--log-every", "1"]) == 0
    meta = json.loads((tmp_path / "digits_model.json").read_text())
    assert meta["training"]["steps_done"] == 2
    pipe = load_reference_pipeline(weights_dir=tmp_path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[0], num_inference_steps=1, output_type="pt").images
    assert out.shape == (1, 1, 32, 32) and torch.isfinite(out).all()


def test_loader_names_missing_files(tmp_path):
    with pytest.raises(ValueError, match="digits_model.json"):
        load_reference_pipeline(weights_dir=tmp_path)


@pytest.mark.parametrize("bad", [dict(image_size=31), dict(axes_dims_rope=[8, 8, 8]), dict(num_heads=0)])
def test_model_config_validates(bad):
    with pytest.raises(ValueError):
        DigitsModelConfig(**bad)
