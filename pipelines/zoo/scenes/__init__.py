"""Procedural scenes: a prompt-conditioned 32x32 RGB model whose task metric can fail.

Prompts follow a small grammar ("a small blue triangle left of a big yellow square on a gray
background"); scenes are drawn on the fly with opencv; an exact checker reads colour, shape, size,
relation and background back from any image. The model is a pixel-space
``FluxTransformer2DModel`` with its own word tokenizer and a tiny text encoder, trained here::

    from dcache.pipelines.zoo.scenes import load_scenes_pipeline, check_adherence, sample_prompts
    pipe = load_scenes_pipeline(device="cpu", dtype=torch.float32)
    prompts = sample_prompts(8, seed=0)
    images = pipe(prompts, num_inference_steps=50, guidance_scale=4.0, output_type="pt").images
    rate = sum(r["whole"] for r in check_adherence(images, prompts)) / len(prompts)
"""
from .checker import adherence_rate, check_adherence
from .grammar import GRAMMAR, VOCABULARY, Scene, SceneObject, parse_prompt, sample_prompts, seed_prompts
from .loader import load_scenes_pipeline, save_scenes_pipeline
from .model import SceneTextEncoder, SceneTokenizer, ScenesModelConfig
from .pipeline import FluxScenesPipeline
from .render import render_scene, sample_batch

__all__ = [
    "GRAMMAR",
    "VOCABULARY",
    "FluxScenesPipeline",
    "Scene",
    "SceneObject",
    "SceneTextEncoder",
    "SceneTokenizer",
    "ScenesModelConfig",
    "adherence_rate",
    "check_adherence",
    "load_scenes_pipeline",
    "parse_prompt",
    "render_scene",
    "sample_batch",
    "sample_prompts",
    "save_scenes_pipeline",
    "seed_prompts",
]
