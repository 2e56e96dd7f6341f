"""Offline loader of the shipped reference digits pipeline."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from .digits_model import CONFIG_FILE, EMBEDDER_FILE, TRANSFORMER_FILE, DigitsModelConfig, build_embedder, build_transformer
from .digits_pipeline import FluxDigitsPipeline

WEIGHTS_DIR = Path(__file__).parent


def load_reference_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: str | Path | None = None,
) -> FluxDigitsPipeline:
    """The reference digits pipeline, read from package data; never touches the network.

    weights_dir: a ``train_digits --out`` folder to load instead of the shipped weights.

    >>> pipe = load_reference_pipeline()
    >>> pipe(class_labels=[0, 1, 2], num_inference_steps=50, guidance_scale=4.0).images  # 3 PIL images
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    for name in (CONFIG_FILE, TRANSFORMER_FILE, EMBEDDER_FILE):
        if not (root / name).is_file():
            raise ValueError(f"{root} has no {name}; pass the folder written by train_digits --out")
    cfg = DigitsModelConfig(**json.loads((root / CONFIG_FILE).read_text())["model"])
    transformer, embedder = build_transformer(cfg), build_embedder(cfg)
    transformer.load_state_dict({k: v.float() for k, v in load_file(str(root / TRANSFORMER_FILE)).items()})
    embedder.load_state_dict({k: v.float() for k, v in load_file(str(root / EMBEDDER_FILE)).items()})
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules (there are none).
    for module in (transformer, embedder):
        torch.nn.Module.to(module, device=device, dtype=dtype).eval()
    return FluxDigitsPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        class_embedder=embedder,
        image_size=cfg.image_size,
    )
