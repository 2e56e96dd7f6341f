"""Offline loading and saving of the scenes pipeline (weights ship as package data)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file, save_file

from .grammar import VOCABULARY
from .model import (
    CONFIG_FILE,
    TEXT_ENCODER_FILE,
    TRANSFORMER_FILE,
    WEIGHT_FILES,
    SceneTokenizer,
    ScenesModelConfig,
    build_text_encoder,
    build_transformer,
    config_of,
)
from .pipeline import FluxScenesPipeline

WEIGHTS_DIR = Path(__file__).parent


SHIPPED_NAME = "dcache/scenes"


def load_scenes_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: str | Path | None = None,
    stochastic_sampling: bool = False,
) -> FluxScenesPipeline:
    """The scenes pipeline, read from package data; never touches the network.

    weights_dir: a folder written by ``train --out`` or :func:`save_scenes_pipeline` to load
    instead of the shipped weights.
    stochastic_sampling: use ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``, which
    re-noises the model's clean estimate with fresh noise at every step (drawn from the call's
    generator) instead of taking an Euler step. Not the default: on the shipped weights it is no
    better than Euler overall (better on some prompt sets, worse on others), and a cache that
    reuses a velocity computed for other noise puts the difference of the two noises into the
    image, so caches are measured on the deterministic (Euler) path, the one FLUX and Wan use
    (pipelines/zoo/README.md, "Sampler").

    >>> pipe = load_scenes_pipeline()
    >>> pipe("a small green triangle above a big red square on a white background").images[0]  # PIL
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    for name in WEIGHT_FILES:
        if not (root / name).is_file():
            raise ValueError(f"{root} has no {name}; pass a folder written by scenes.train --out")
    meta = json.loads((root / CONFIG_FILE).read_text())
    if tuple(meta.get("vocabulary", ())) != VOCABULARY:
        raise ValueError(f"{root / CONFIG_FILE} was trained on another vocabulary than {VOCABULARY}")
    cfg = config_of(meta)
    transformer, text_encoder = build_transformer(cfg), build_text_encoder(cfg, SceneTokenizer(cfg.text_layout, cfg.patch))
    transformer.load_state_dict({k: v.float() for k, v in load_file(str(root / TRANSFORMER_FILE)).items()})
    if weights_dir is None:
        # A checkpoint name, so per-checkpoint tables (MagCache's ratios) recognise the shipped weights.
        transformer.register_to_config(_name_or_path=SHIPPED_NAME)
    text_encoder.load_state_dict({k: v.float() for k, v in load_file(str(root / TEXT_ENCODER_FILE)).items()})
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules (there are none).
    for module in (transformer, text_encoder):
        torch.nn.Module.to(module, device=device, dtype=dtype).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=stochastic_sampling)
    return FluxScenesPipeline(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              image_size=cfg.image_size, patch=cfg.patch, text_layout=cfg.text_layout)


def save_scenes_pipeline(pipe: FluxScenesPipeline, out: str | Path) -> None:
    """Write ``pipe``'s weights (float32) and config so ``load_scenes_pipeline(weights_dir=out)`` reads them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ScenesModelConfig(
        image_size=pipe.config.image_size, patch=pipe.config.patch,
        num_heads=pipe.transformer.config.num_attention_heads, head_dim=pipe.transformer.config.attention_head_dim,
        num_double_blocks=pipe.transformer.config.num_layers, num_single_blocks=pipe.transformer.config.num_single_layers,
        axes_dims_rope=list(pipe.transformer.config.axes_dims_rope), text_dim=pipe.text_encoder.config.dim,
        text_layers=pipe.text_encoder.config.layers, text_heads=pipe.text_encoder.config.heads,
        text_layout=pipe.config.text_layout,
    )
    full = lambda m: {k: v.detach().float().cpu().contiguous() for k, v in m.state_dict().items()}
    save_file(full(pipe.transformer), str(out / TRANSFORMER_FILE))
    save_file(full(pipe.text_encoder), str(out / TEXT_ENCODER_FILE))
    from dataclasses import asdict

    (out / CONFIG_FILE).write_text(json.dumps({"model": asdict(cfg), "vocabulary": list(VOCABULARY)}, indent=2))
