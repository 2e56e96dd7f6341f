"""FluxScenesPipeline: prompt -> 32x32 RGB scene, pixel-space, with a real FluxTransformer2DModel.

Classifier-free guidance follows FluxPipeline's "true CFG": two transformer calls per step, the
conditional one inside ``transformer.cache_context("cond")`` and the unconditional (empty prompt)
one inside ``cache_context("uncond")``, so diffusers' cache hooks keep one state per branch.
``current_timestep`` is exposed for PAB/FasterCache's timestep callbacks. The class name starts
with "Flux" so cache-dit's Flux adapter matches it by prefix.
"""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .grammar import parse_prompt
from .model import SceneTextEncoder, SceneTokenizer, image_ids, pack, unpack
from .._flow_loop import FlowLoopMixin, flow_cfg_loop

OUTPUT_TYPES = ("pil", "np", "pt")


class FluxScenesPipeline(FlowLoopMixin, DiffusionPipeline):
    """Draw the scene a prompt describes (see ``grammar.GRAMMAR``), 32x32 RGB.

    >>> from dcache.pipelines.zoo.scenes import load_scenes_pipeline
    >>> pipe = load_scenes_pipeline()
    >>> out = pipe(["a big red circle left of a small blue square on a black background"],
    ...            num_inference_steps=50, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
    ...            output_type="pt")
    >>> out.images.shape
    torch.Size([1, 3, 32, 32])
    """

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: SceneTextEncoder,
        image_size: int = 32,
        patch: int = 4,
        text_layout: str = "slots",
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder)
        self.register_to_config(image_size=image_size, patch=patch, text_layout=text_layout)
        # Plain attribute, not a registered module: it holds no weights, only the fixed vocabulary.
        self.tokenizer = SceneTokenizer(text_layout, patch)
        self._current_timestep = None
        self._guidance_scale = 1.0
        self._num_timesteps = 0
        self._interrupt = False

    @staticmethod
    def _prompts(prompt) -> list[str]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        for p in prompts:
            parse_prompt(p)  # a ValueError naming the grammar and vocabulary
        return prompts

    @staticmethod
    def _check_args(num_inference_steps, guidance_scale, output_type) -> None:
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0 (<= 1 disables guidance), got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    def _velocity(self, latents, timestep, tokens, pooled, img_ids, txt_ids):
        return self.transformer(
            hidden_states=latents, timestep=timestep, pooled_projections=pooled, encoder_hidden_states=tokens,
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per prompt.

        Args:
            prompt: one prompt or a list (see ``dcache.pipelines.zoo.scenes.VOCABULARY`` and the
                grammar in the error message a bad prompt gives).
            num_inference_steps: steps of the flow-matching sampler (Euler; see ``load_scenes_pipeline``
                for the stochastic variant).
            guidance_scale: classifier-free guidance weight; <= 1 runs only the conditional branch.
            generator: seeds the starting noise, and a stochastic sampler's fresh noise (one generator,
                or one per image).
            latents: starting noise, packed tokens (batch, 64, 48).
            output_type: "pil" (RGB images), "np" (batch, 32, 32, 3) float32 in [0, 1] or
                "pt" (batch, 3, 32, 32) float32 in [0, 1].
        """
        self._check_args(num_inference_steps, guidance_scale, output_type)
        prompts = self._prompts(prompt)
        batch, size, patch = len(prompts), self.config.image_size, self.config.patch
        device, dtype = self._execution_device, self.transformer.dtype
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False

        tokens, pooled = self.text_encoder(self.tokenizer(prompts, device=device))
        tokens, pooled = tokens.to(dtype), pooled.to(dtype)
        if self.do_classifier_free_guidance:
            neg_tokens, neg_pooled = self.text_encoder(self.tokenizer.null(batch, device=device))
            neg_tokens, neg_pooled = neg_tokens.to(dtype), neg_pooled.to(dtype)
        img_ids = image_ids(size, size, patch, device=device, dtype=dtype)
        txt_ids = self.tokenizer.positions(device=device, dtype=dtype)

        shape = (batch, (size // patch) ** 2, 3 * patch * patch)
        if latents is None:
            latents = pack(randn_tensor((batch, 3, size, size), generator=generator, device=device, dtype=dtype), patch)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)

        uncond = (neg_tokens, neg_pooled) if self.do_classifier_free_guidance else None
        latents = flow_cfg_loop(self, latents, num_inference_steps, device, dtype, (tokens, pooled), uncond,
                                img_ids, txt_ids, generator=generator)

        images = ((unpack(latents.float(), size, size, patch) + 1.0) / 2.0).clamp(0.0, 1.0)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
