"""The training script writes a checkpoint that the loader reads back."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from dcache.pipelines.zoo import DigitsModelConfig, load_reference_pipeline
from dcache.pipelines.zoo.train_digits import main


def test_two_steps_write_a_loadable_checkpoint(tmp_path):
    assert main(["--out", str(tmp_path), "--steps", "5", "--stop-after", "2", "--batch-size", "2", "--log-every", "1"]) == 0
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


def test_profile_forward_reports_a_fraction():
    from dcache.pipelines.zoo.profile_forward import profile

    r = profile(batch=1, reps=1)
    assert 0.0 < r["fraction_in_attn_mlp"] < 1.0
    # Every expected site was timed: attention in both block kinds, MLPs, and the single-block output.
    assert {"transformer_blocks.attn", "transformer_blocks.ff", "transformer_blocks.ff_context",
            "single_transformer_blocks.attn", "single_transformer_blocks.proj_mlp",
            "single_transformer_blocks.proj_out"} <= set(r["by_site_ms"])


def test_save_grid_writes_rows_by_columns(tmp_path):
    import PIL.Image

    from dcache.pipelines.zoo.evaluate_digits import save_grid

    images = torch.rand(6, 1, 32, 32)
    save_grid(images, rows=2, path=tmp_path / "g.png", scale=1)
    im = PIL.Image.open(tmp_path / "g.png")
    assert im.size == (3 * 32, 2 * 32) and im.mode == "L"
