"""Small reference models trained here; their weights ship with the package.

The digits model (``FluxDigitsPipeline``, ``dcache bench --model digits``; the default bench model is
the scenes model in ``dcache.pipelines.zoo.scenes``)::

    from dcache.pipelines.zoo import load_reference_pipeline, load_digit_classifier
    pipe = load_reference_pipeline(device="cpu", dtype=torch.float32)
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=50, guidance_scale=4.0, output_type="np").images
    accuracy = (load_digit_classifier().score(images) == torch.tensor([0, 1, 2])).float().mean()
"""
from .digit_classifier import DigitClassifier, load_digit_classifier
from .digits_model import DigitsClassEmbedder, DigitsModelConfig, load_digit_images
from .digits_pipeline import FluxDigitsPipeline
from .reference import load_reference_pipeline

__all__ = [
    "DigitClassifier",
    "DigitsClassEmbedder",
    "DigitsModelConfig",
    "FluxDigitsPipeline",
    "load_digit_classifier",
    "load_digit_images",
    "load_reference_pipeline",
]
