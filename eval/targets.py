"""The models ``dcache eval`` can generate from, behind one small interface.

A :class:`EvalModel` draws one sample for (seed, condition); a condition is a class label or a
prompt. Built-in models also carry their task metric (is the sample what was asked for?).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# The model `dcache eval` uses with no --model: the prompt-conditioned scenes model (issue #16),
# whose adherence metric can fail; "digits" stays available by name.
DEFAULT_IMAGE_MODEL = "scenes"
BUILTIN_IMAGE_MODELS = ("digits", "scenes")


@dataclass
class EvalModel:
    pipe: Any
    name: str
    conditioning: str  # "class" or "prompt"
    draw: Callable[[int, Any, int, float | None], torch.Tensor]  # (seed, cond, steps, guidance) -> (1, C, H, W)
    default_conditions: Callable[[int], list[Any]]  # n -> conditions for samples 0..n-1
    task_metric: Callable[[torch.Tensor, list[Any]], list[float]] | None = None  # per sample, in [0, 1]
    task_metric_name: str | None = None
    text: Callable[[Any], str] = str  # the caption of a condition (CLIP score)
    separate_cfg: bool = True
    info: dict = field(default_factory=dict)


def _as_images(out: Any) -> torch.Tensor:
    from dcache.eval.bench_image import _as_images as as_images

    return as_images(out)


def load_model(model: str | None, device: str, weights_dir: str | None = None, *, num_frames: int | None = None,
               height: int | None = None, width: int | None = None) -> EvalModel:
    """An embedded model by name, or a diffusers pipeline (image or video) from a directory or hub id.

    ``num_frames`` / ``height`` / ``width`` go to a diffusers pipeline's call (None: its defaults).
    """
    model = model or DEFAULT_IMAGE_MODEL
    if model == "digits":
        return _digits(device, weights_dir)
    if model == "scenes":
        return _scenes(device, weights_dir)
    return _diffusers(model, device, num_frames, height, width)


def _digits(device: str, weights_dir: str | None) -> EvalModel:
    from dcache.pipelines.zoo.digit_classifier import load_digit_classifier
    from dcache.pipelines.zoo.reference import load_reference_pipeline

    pipe = load_reference_pipeline(device=device, weights_dir=weights_dir)
    pipe.set_progress_bar_config(disable=True)
    clf = load_digit_classifier(device=device)

    def draw(seed: int, label: Any, steps: int, guidance: float | None) -> torch.Tensor:
        out = pipe(class_labels=[int(label)], num_inference_steps=steps,
                   guidance_scale=4.0 if guidance is None else guidance,
                   generator=torch.Generator(device).manual_seed(seed), output_type="pt")
        return _as_images(out)

    def correct(images: torch.Tensor, labels: list[Any]) -> list[bool]:
        pred = clf.score(images)
        return [bool(p == int(c)) for p, c in zip(pred.tolist(), labels)]

    return EvalModel(pipe, "embedded digits (FluxTransformer2DModel, class-conditional)", "class", draw,
                     lambda n: [i % 10 for i in range(n)], correct, "class_accuracy",
                     text=lambda c: f"a handwritten digit {c}", info={"num_classes": 10})


def _scenes(device: str, weights_dir: str | None) -> EvalModel:
    """The embedded prompt-conditioned scenes model. Without ``--prompts`` sample ``i`` draws the
    grammar's prompt for its seed (``sample_prompts(1, seed)``, as ``dcache bench`` does); the task
    metrics are the scenes checker's whole-prompt adherence (``task``) and the share of single
    checks passed (``attributes``: background, count, relation, each object's colour/shape/size)."""
    from dcache.pipelines.zoo.scenes import check_adherence, load_scenes_pipeline
    from dcache.eval.bench_image import attribute_rate, scene_prompts

    pipe = load_scenes_pipeline(device=device, dtype=torch.float32, weights_dir=weights_dir)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    def draw(seed: int, prompt: Any, steps: int, guidance: float | None) -> torch.Tensor:
        kw: dict[str, Any] = {"num_inference_steps": steps, "output_type": "pt",
                              "generator": torch.Generator(device).manual_seed(seed)}
        if guidance is not None:
            kw["guidance_scale"] = guidance
        return _as_images(pipe(str(prompt), **kw))

    def adherent(images: torch.Tensor, prompts: list[Any]) -> list[bool]:
        return [bool(r["whole"]) for r in check_adherence(images, [str(p) for p in prompts])]

    def attributes(images: torch.Tensor, prompts: list[Any]) -> dict[str, float]:
        return {"attributes": attribute_rate(check_adherence(images, [str(p) for p in prompts]))}

    return EvalModel(pipe, "embedded scenes (FluxTransformer2DModel, prompt-conditioned)", "prompt", draw,
                     lambda n: scene_prompts(list(range(n))), adherent, "prompt_adherence",
                     info={"seed_conditions": scene_prompts, "task_extra": attributes})


def _diffusers(model: str, device: str, num_frames: int | None = None, height: int | None = None,
               width: int | None = None) -> EvalModel:
    from diffusers import DiffusionPipeline

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from dcache.eval import video_pipelines as vp

    # eval draws its own progress bar; the loaders' bars would bury its one-line errors on stderr.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(os.path.expanduser(model)).to(device)
    except Exception as e:  # noqa: BLE001 - report any loading failure the same way
        raise ValueError(f"--model {model!r}: cannot load a diffusers pipeline: {str(e).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    params = inspect.signature(type(pipe).__call__).parameters
    video = "num_frames" in params
    if "prompt" in params:
        conditioning = "prompt"
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            from dcache.eval.cli_errors import UsageError

            raise UsageError(f"--model {model!r} has no text_encoder/tokenizer, so prompts cannot be encoded; "
                             "save the pipeline with them (pipe.save_pretrained) or use the hub checkpoint")
    elif "class_labels" in params:
        conditioning = "class"
    else:
        conditioning = "none"
    if not video and num_frames is not None:
        from dcache.eval.cli_errors import UsageError

        raise UsageError(f"--num-frames applies to video pipelines; {type(pipe).__name__} makes images")
    if video:
        vp.check_frames(pipe, num_frames)
    for flag, v in (("height", height), ("width", width)):
        if v is not None and flag not in params:
            from dcache.eval.cli_errors import UsageError

            raise UsageError(f"--{flag} does not apply to {type(pipe).__name__}")
    size = {k: v for k, v in (("height", height), ("width", width), ("num_frames", num_frames)) if v is not None}

    def draw(seed: int, cond: Any, steps: int, guidance: float | None) -> torch.Tensor:
        kw: dict[str, Any] = {"num_inference_steps": steps, "output_type": "pt",
                              "generator": torch.Generator(device).manual_seed(seed), **size}
        if guidance is not None and "guidance_scale" in params:
            kw["guidance_scale"] = guidance
        if conditioning == "prompt":
            kw["prompt"] = [str(cond)]
        elif conditioning == "class":
            kw["class_labels"] = [int(cond)]
        out = pipe(**kw)
        return vp.as_video(out) if video else _as_images(out)

    def defaults(n: int) -> list[Any]:
        if conditioning == "prompt":
            raise ValueError(f"--model {model!r} takes prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
        return [i % 10 for i in range(n)] if conditioning == "class" else [None] * n

    info: dict[str, Any] = {"kind": "video", "fps": vp.fps_of(pipe)} if video else {}
    return EvalModel(pipe, f"{type(pipe).__name__} from {model}", conditioning, draw, defaults, info=info)


# -- autoregressive video -----------------------------------------------------------------------

BUILTIN_VIDEO_MODELS = ("reference",)


def load_video_model(model: str | None, device: str, num_frames: int) -> EvalModel:
    """The AR-video pipeline (default: the shipped reference, digits bouncing on a 24x24 canvas).

    ``draw`` returns (1, C, F, H, W) in [0, 1]. No task metric: the digit classifier, trained on
    32x32 full-frame digits, reads the small bouncing digit of the 24x24 canvas wrongly (0-17% of
    frames on kv-full samples), so it would not measure anything.
    """
    from dcache.pipelines.ar_video.reference import load_reference, sample_prompts

    pipe = load_reference(None if model in (None, "reference") else os.path.expanduser(model))
    pipe.transformer.to(device)
    if num_frames % pipe.config.chunk_frames:
        from dcache.eval.cli_errors import UsageError

        raise UsageError(f"--num-frames must be a multiple of the model's chunk of {pipe.config.chunk_frames} frames, "
                         f"got {num_frames}")

    def draw(seed: int, prompt: Any, steps: int, guidance: float | None) -> torch.Tensor:
        out = pipe(prompt=[tuple(prompt)], num_frames=num_frames, seed=seed)
        return out.frames.float().cpu().clamp(0, 1)

    return EvalModel(pipe, "embedded AR video (WanTransformer3DModel, digit + velocity prompts)", "prompt", draw,
                     lambda n: [list(p) for p in sample_prompts(n, 0)], None, None,
                     text=lambda p: f"digit {p[0]} moving ({p[1]}, {p[2]})", separate_cfg=False,
                     info={"kind": "video", "fps": 8})


# -- diffusion language models ------------------------------------------------------------------

def dllm_valid_answers(prompt: torch.Tensor, mask: torch.Tensor, gen_length: int) -> torch.Tensor:
    """Every valid answer of one "scripts" problem, (n_allowed, gen_length): the prompt's message
    repeated over the canvas, written in each allowed script in turn (increasing script order)."""
    from dcache.pipelines.dllm import scripts_task as task

    real = prompt[mask.bool()].cpu()
    scripts = [int(t) - task.MARK0 + 1 for t in real if task.MARK0 <= int(t) < task.MARK0 + task.N_SCRIPTS]
    msg = prompt.cpu()[-1 - task.PERIOD:-1]
    digits = msg[torch.arange(gen_length) % task.PERIOD]
    return torch.stack([10 * s + digits for s in scripts])


def load_dllm_model(model: str | None, device: str, gen_length: int, block_length: int) -> EvalModel:
    """A LLaDA-style dLLM (default: the shipped "scripts" reference model) on its "scripts" task.

    Sample ``i`` is the problem drawn with seed ``seeds[i]`` (``scripts_task.make_problems``: the
    prompt left-padded, with its attention mask); ``draw`` returns the generated canvas
    (1, gen_length) as token ids (LLaDA low-confidence remasking, one token per step, the prompt
    mask passed to the sampler). Each prompt has 2-3 valid answers (one per allowed script); the
    task metric is exact match of the whole canvas with any of them (``scripts_task.valid_rows``).
    The model was trained at gen lengths 64 and 256.
    """
    from dcache.eval.bench_dllm import default_model_dir
    from dcache.pipelines.dllm import scripts_task as task
    from dcache.pipelines.dllm.generate import llada_generate
    from dcache.pipelines.dllm.modeling import LLaDAModelLM

    lm = LLaDAModelLM.from_pretrained(os.path.expanduser(model) if model else default_model_dir("llada"), device=device)

    def problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt (1, P), prompt mask (1, P), one valid answer (1, gen_length)) of the seed's problem."""
        return task.make_problems(1, gen_length=gen_length, seed=seed)

    def draw(seed: int, cond: Any, steps: int, guidance: float | None) -> torch.Tensor:
        prompt, mask, _ = problem(seed)
        out = llada_generate(lm, prompt.to(device), mask.to(device), gen_length=gen_length,
                             block_length=block_length, steps=gen_length)
        return out.sequences.cpu()

    def correct(output: torch.Tensor, seed: int) -> bool:
        prompt, mask, _ = problem(int(seed))
        return bool(task.valid_rows(output.reshape(1, -1).cpu(), prompt, mask)[0])

    def exact(outputs: torch.Tensor, seeds: list[Any]) -> list[float]:
        return [float(correct(o, s)) for o, s in zip(outputs, seeds)]

    def prompt_text(seed: int) -> str:
        prompt, mask, _ = problem(int(seed))
        return task.render(prompt[0][mask[0]])

    def answers(seed: int) -> list[str]:
        prompt, mask, _ = problem(int(seed))
        return [task.render(a) for a in dllm_valid_answers(prompt[0], mask[0], gen_length)]

    return EvalModel(lm, "embedded dLLM (LLaDA-style, scripts task)", "problem", draw, lambda n: list(range(n)),
                     exact, "exact_match", text=prompt_text,
                     info={"kind": "text", "render": task.render, "problem": problem, "correct": correct,
                           "prompt_text": prompt_text, "answers": answers})
