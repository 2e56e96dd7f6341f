"""FluxDigitsPipeline: class-conditional pixel-space digits with a real FluxTransformer2DModel.

Classifier-free guidance follows FluxPipeline's "true CFG": two transformer calls per step, the
conditional one inside ``transformer.cache_context("cond")`` and the unconditional one inside
``cache_context("uncond")``, so diffusers' own cache hooks (FBCache, TaylorSeer, MagCache) keep one
state per branch. ``current_timestep`` is exposed for PAB/FasterCache's timestep callbacks. The
class name starts with "Flux" so cache-dit's Flux adapter matches it by prefix.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .digits_model import DigitsClassEmbedder, image_ids, pack, text_ids, unpack
from ._flow_loop import FlowLoopMixin, flow_cfg_loop

OUTPUT_TYPES = ("pil", "np", "pt")


class FluxDigitsPipeline(FlowLoopMixin, DiffusionPipeline):
    """Draw handwritten-looking digits 0-9 (grey, 32x32 by default).

    >>> from dcache.pipelines.zoo import load_reference_pipeline
    >>> pipe = load_reference_pipeline()
    >>> out = pipe(class_labels=[3, 7], num_inference_steps=50, guidance_scale=4.0,
    ...            generator=torch.Generator().manual_seed(0), output_type="np")
    >>> out.images.shape
    (2, 32, 32, 1)
    """

    model_cpu_offload_seq = "class_embedder->transformer"

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        class_embedder: DigitsClassEmbedder,
        image_size: int = 32,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, class_embedder=class_embedder)
        self.register_to_config(image_size=image_size)
        self._current_timestep = None
        self._guidance_scale = 1.0
        self._num_timesteps = 0
        self._interrupt = False

    @property
    def num_classes(self) -> int:
        return self.class_embedder.config.num_classes

    def _labels(self, class_labels) -> torch.Tensor:
        if isinstance(class_labels, torch.Tensor):
            values = class_labels.flatten().tolist()
        elif isinstance(class_labels, (int, np.integer)) and not isinstance(class_labels, bool):
            values = [int(class_labels)]
        elif isinstance(class_labels, Sequence) and not isinstance(class_labels, str):
            values = list(class_labels)
        else:
            values = None
        accepted = f"integers in [0, {self.num_classes - 1}] (one per image)"
        if not values:
            raise ValueError(f"class_labels must be an int or a non-empty list of {accepted}, got {class_labels!r}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) and not (
                isinstance(v, float) and float(v).is_integer()
            ):
                raise ValueError(f"class_labels must be {accepted}, got {v!r}")
            if not 0 <= int(v) < self.num_classes:
                raise ValueError(f"class_labels must be {accepted}, got {int(v)}")
        return torch.tensor([int(v) for v in values], dtype=torch.long, device=self._execution_device)

    @staticmethod
    def _check_args(height: int, width: int, num_inference_steps: int, guidance_scale: float, output_type: str) -> None:
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < 2 or v % 2:
                raise ValueError(
                    f"{name} must be a positive even integer (the model packs 2x2 pixel patches; "
                    f"it was trained at 32), got {v!r}"
                )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0 (<= 1 disables guidance), got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    def _velocity(self, latents, timestep, tokens, pooled, img_ids, txt_ids):
        return self.transformer(
            hidden_states=latents,
            timestep=timestep,
            pooled_projections=pooled,
            encoder_hidden_states=tokens,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per entry of ``class_labels``.

        Args:
            class_labels: digit(s) 0-9 to draw.
            num_inference_steps: Euler steps of the flow-matching sampler.
            guidance_scale: classifier-free guidance weight; <= 1 runs only the conditional branch.
            height, width: even pixel sizes (default 32, the training size).
            generator: seeds the starting noise (one generator, or one per image).
            latents: starting noise, packed tokens (batch, height/2 * width/2, 4).
            output_type: "pil" (grey "L" images), "np" (batch, H, W, 1) float32 in [0, 1] or
                "pt" (batch, 1, H, W) in [0, 1].
        """
        height = self.config.image_size if height is None else height
        width = self.config.image_size if width is None else width
        self._check_args(height, width, num_inference_steps, guidance_scale, output_type)
        labels = self._labels(class_labels)
        batch = labels.shape[0]
        device, dtype = self._execution_device, self.transformer.dtype
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False

        tokens, pooled = self.class_embedder(labels)
        tokens, pooled = tokens.to(dtype), pooled.to(dtype)
        if self.do_classifier_free_guidance:
            null = torch.full_like(labels, self.class_embedder.null_label)
            neg_tokens, neg_pooled = self.class_embedder(null)
            neg_tokens, neg_pooled = neg_tokens.to(dtype), neg_pooled.to(dtype)
        img_ids = image_ids(height, width, device=device, dtype=dtype)
        txt_ids = text_ids(tokens.shape[1], device=device, dtype=dtype)

        shape = (batch, (height // 2) * (width // 2), 4)
        if latents is None:
            latents = pack(randn_tensor((batch, 1, height, width), generator=generator, device=device, dtype=dtype))
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)

        uncond = (neg_tokens, neg_pooled) if self.do_classifier_free_guidance else None
        latents = flow_cfg_loop(self, latents, num_inference_steps, device, dtype, (tokens, pooled), uncond,
                                img_ids, txt_ids, generator=generator)

        images = ((unpack(latents.float(), height, width) + 1.0) / 2.0).clamp(0.0, 1.0)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
