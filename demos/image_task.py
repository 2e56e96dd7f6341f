"""The image tab's work: load a model, run baseline and policy on the same seed, compare.

Models: the embedded reference models by name (``digits``; ``scenes`` once that model is in the
build) or any local directory / hub id of a diffusers pipeline whose denoiser dcache supports.
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import dcache
from dcache.demos.pool import GENERATIONS, BaselineCache, InstancePool

__all__ = ["DEFAULT_IMAGE_MODEL", "EMBEDDED_MODELS", "ImageModel", "ImageResult", "get_model", "run_image",
           "default_condition", "image_configs", "policy_label", "MAX_STEPS"]

# The prompt-conditioned scenes model (issue #16) is the default; digits stays selectable.
DEFAULT_IMAGE_MODEL = "scenes"
EMBEDDED_MODELS = {
    "digits": "embedded class-conditional digits (FluxTransformer2DModel, 32x32)",
    "scenes": "embedded text-to-image scenes (FluxTransformer2DModel)",
}
MAX_STEPS = 200

Progress = Callable[[float, str], None]


@dataclass
class ImageModel:
    key: str
    title: str
    cond_kind: str  # "class" or "prompt"
    default_condition: str
    default_guidance: float
    pool: InstancePool
    call: Callable[[Any, Any, int, int, float], Any]  # (pipe, condition, seed, steps, guidance) -> output
    parse_condition: Callable[[str], Any]
    adherence: Callable[[torch.Tensor, Any], str] | None = None


@dataclass
class ImageResult:
    baseline: torch.Tensor  # (C, H, W) in [0, 1]
    accelerated: torch.Tensor
    baseline_s: float
    accelerated_s: float
    baseline_cached: bool
    stats: dict[str, Any]
    calls: int
    adherence: str = ""
    speedup: float = field(init=False)
    psnr: float = field(init=False)

    def __post_init__(self) -> None:
        from dcache.demos.media import psnr

        self.speedup = self.baseline_s / self.accelerated_s if self.accelerated_s > 0 else float("inf")
        self.psnr = psnr(self.baseline, self.accelerated)


def _as_image(out: Any) -> torch.Tensor:
    x = getattr(out, "images", None)
    if x is None:
        x = out[0]
    if isinstance(x, list):  # PIL
        import numpy as np

        x = torch.from_numpy(np.asarray(x[0], dtype="float32") / 255.0)[None]
        if x.ndim == 3:
            x = x[..., None]
    x = torch.as_tensor(x).float().cpu()
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    return x[0]


def _denoiser(pipe: Any) -> torch.nn.Module:
    from dcache.engine import find_denoiser

    return find_denoiser(pipe)[0]


def _check_supported(pipe: Any) -> None:
    """Raise the adapter registry's ValueError now, before any generation, for an unsupported model."""
    from dcache.pipelines.adapters import get_adapter

    get_adapter(_denoiser(pipe))


def _digits_model() -> ImageModel:
    from dcache.pipelines.zoo.digit_classifier import load_digit_classifier
    from dcache.pipelines.zoo.reference import load_reference_pipeline

    def factory():
        pipe = load_reference_pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def parse(text: str) -> int:
        t = str(text).strip()
        if not t.isdigit() or not 0 <= int(t) <= 9:
            raise ValueError(f"the digits model takes a class label 0-9, got {text!r}")
        return int(t)

    def call(pipe, label, seed, steps, guidance):
        return pipe(class_labels=[label], num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed), output_type="pt")

    clf = load_digit_classifier()

    def adherence(images: torch.Tensor, label: int) -> str:
        pred = clf.score(images)
        return ", ".join(f"{name} reads {int(p)}" + (" (ok)" if int(p) == label else " (wrong)")
                         for name, p in zip(("baseline", "accelerated"), pred))

    return ImageModel("digits", EMBEDDED_MODELS["digits"], "class", "3", 4.0, InstancePool(factory), call, parse,
                      adherence)


def _scenes_model() -> ImageModel:
    from dcache.pipelines.zoo.scenes import check_adherence, load_scenes_pipeline, sample_prompts

    def factory():
        pipe = load_scenes_pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call(pipe, prompt, seed, steps, guidance):
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed), output_type="pt")

    def parse(text: str) -> str:
        if not str(text).strip():
            raise ValueError("the scenes model needs a prompt, e.g. 'a red circle left of a blue square'")
        return str(text).strip()

    def adherence(images: torch.Tensor, prompt: str) -> str:
        res = check_adherence(images, [prompt] * images.shape[0])
        return ", ".join(f"{name} {'follows' if r['whole'] else 'misses'} the prompt"
                         for name, r in zip(("baseline", "accelerated"), res))

    return ImageModel("scenes", EMBEDDED_MODELS["scenes"], "prompt", sample_prompts(1, 0)[0], 4.0,
                      InstancePool(factory), call, parse, adherence)


def _pipeline_model(path: str) -> ImageModel:
    from diffusers import DiffusionPipeline

    def factory():
        try:
            pipe = DiffusionPipeline.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any loading failure is reported the same way
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot load a diffusers pipeline from {path!r}: {first}") from None
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe = factory()
    _check_supported(pipe)
    params = inspect.signature(type(pipe).__call__).parameters
    if "class_labels" in params:
        def parse(t: str) -> int:
            if not str(t).strip().isdigit():
                raise ValueError(f"{type(pipe).__name__} takes an integer class label >= 0, got {t!r}")
            return int(str(t).strip())

        cond_kind, default = "class", "0"
    elif "prompt" in params:
        cond_kind, default, parse = "prompt", "a photo of a cat", lambda t: str(t)
    else:
        raise ValueError(f"{type(pipe).__name__} takes neither class_labels nor prompt; the demo cannot drive it")

    def call(p, cond, seed, steps, guidance):
        kw: dict[str, Any] = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed)}
        if "guidance_scale" in params:
            kw["guidance_scale"] = guidance
        if "output_type" in params:
            kw["output_type"] = "pt"
        kw["class_labels" if cond_kind == "class" else "prompt"] = [cond] if cond_kind == "class" else cond
        return p(**kw)

    # The instance loaded to check support serves first; a user pipeline may be large, so requests
    # share this one instance in turn instead of loading a copy each.
    pool = InstancePool(factory, initial=[pipe], max_instances=1)
    return ImageModel(path, f"{type(pipe).__name__} from {path}", cond_kind, default, 4.0, pool, call, parse)


def default_condition(name: str) -> str:
    """What the condition box starts with for an embedded model (no model is loaded for it)."""
    if name == "scenes":
        from dcache.pipelines.zoo.scenes import sample_prompts

        return sample_prompts(1, 0)[0]
    return "3"


_MODELS: dict[str, ImageModel] = {}
_MODELS_LOCK = threading.Lock()


def get_model(name: str) -> ImageModel:
    """The model by embedded name, local directory or hub id (loaded once, then shared)."""
    name = (name or "").strip()
    if not name:
        raise ValueError(f"give a model: one of {', '.join(EMBEDDED_MODELS)}, a local pipeline directory or a hub id")
    with _MODELS_LOCK:
        if name in _MODELS:
            return _MODELS[name]
    if name == "digits":
        model = _digits_model()
    elif name == "scenes":
        model = _scenes_model()
    else:
        model = _pipeline_model(name)
    with _MODELS_LOCK:
        return _MODELS.setdefault(name, model)


_BASELINES = BaselineCache()


def baseline_cache() -> BaselineCache:
    return _BASELINES


def _check_request(steps: Any, seed: Any, guidance: Any) -> tuple[int, int, float]:
    try:
        steps_i, seed_i, g = int(steps), int(seed), float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"steps and seed must be integers and guidance a number, got {steps!r}, {seed!r}, {guidance!r}") from None
    if steps_i != float(steps) or not 2 <= steps_i <= MAX_STEPS:
        raise ValueError(f"steps must be an integer in [2, {MAX_STEPS}], got {steps!r}")
    if seed_i < 0 or seed_i != float(seed):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not 0 <= g <= 30:
        raise ValueError(f"guidance must be in [0, 30], got {guidance!r}")
    return steps_i, seed_i, g


def _timed(model: ImageModel, pipe: Any, cond: Any, seed: int, steps: int, guidance: float,
           progress: Progress | None, expected: int, what: str) -> tuple[torch.Tensor, float, int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1
        if progress is not None:
            progress(min(calls[0] / max(expected, 1), 1.0), f"{what}: denoiser call {calls[0]}/{expected}")

    h = _denoiser(pipe).register_forward_pre_hook(hook)
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.call(pipe, cond, seed, steps, guidance)
        dt = time.perf_counter() - t0
    finally:
        h.remove()
    return _as_image(out), dt, calls[0]


def _warm(model: ImageModel, pipe: Any) -> None:
    """First use of an instance: one plain and one hooked step, so neither timed run pays torch's
    first-call costs or dcache's one-off FLOP measurement for this input shape (which must not
    overlap another generation: see :class:`dcache.demos.pool.SharedExclusiveLock`)."""
    if getattr(pipe, "_dcache_demo_warm", False):
        return
    cond = model.parse_condition(model.default_condition)
    with GENERATIONS.exclusive(), torch.no_grad():
        model.call(pipe, cond, 0, 1, model.default_guidance)
        with dcache.accelerated(pipe, "none"):
            model.call(pipe, cond, 0, 1, model.default_guidance)
    pipe._dcache_demo_warm = True


def image_configs(policy: str, options: dict[str, Any], spec: str = "") -> list[Any]:
    """Validated configs: ``policy`` with ``options``, or a policy list ``spec`` in the command line's
    syntax (``teacache(threshold=0.3),taylorseer(interval=4)``, one policy per granularity)."""
    from dcache.demos.knobs import build_config

    if spec and spec.strip():
        from dcache.eval.policy_spec import parse_policies

        configs = [build_config(name, "image", opts) for name, opts in parse_policies(spec, task="image")]
        dcache.resolve_policy(configs, {}, "image")  # refuses two policies at one granularity
        return configs
    return [build_config(policy, "image", options)]


def policy_label(configs: list[Any]) -> str:
    return " + ".join(type(c).policy_name for c in configs)


def run_image(model_name: str, condition: str, seed: Any, steps: Any, guidance: Any, policy: str,
              options: dict[str, Any], progress: Progress | None = None, spec: str = "") -> ImageResult:
    """Baseline (cached per model, condition, seed, steps, guidance) and the policy (or the policy
    list ``spec``) on the same seed."""
    steps, seed, guidance = _check_request(steps, seed, guidance)
    configs = image_configs(policy, options, spec)  # bad options fail before any model is loaded
    model = get_model(model_name)
    cond = model.parse_condition(condition)
    key = (model.key, repr(cond), seed, steps, guidance)
    base = _BASELINES.get(key)
    cached = base is not None
    if base is None:
        with model.pool.checkout() as pipe:
            _warm(model, pipe)
            with GENERATIONS.shared():
                img, dt, calls = _timed(model, pipe, cond, seed, steps, guidance, progress, steps * 2, "baseline")
        base = (img, dt, calls)
        _BASELINES.put(key, base)
    b_img, b_dt, calls = base
    with model.pool.checkout() as pipe:
        _warm(model, pipe)
        dcache.accelerate(pipe, configs)
        try:
            with GENERATIONS.shared():
                a_img, a_dt, _ = _timed(model, pipe, cond, seed, steps, guidance, progress, calls,
                                        policy_label(configs))
            stats = pipe.dcache.stats()
        finally:
            dcache.disable(pipe)
    adherence = model.adherence(torch.stack([b_img, a_img]), cond) if model.adherence else ""
    return ImageResult(b_img, a_img, b_dt, a_dt, cached, stats, calls, adherence)
