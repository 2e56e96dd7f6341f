"""Class accuracy of generated digits (scored by the shipped classifier) and a sample grid PNG.

Usage::

    python -m dcache.pipelines.zoo.evaluate_digits --per-class 5 --steps 50 --guidance 4 \\
        --grid pipelines/zoo/digits_samples.png
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .digit_classifier import load_digit_classifier
from .reference import load_reference_pipeline


def save_grid(images: torch.Tensor, rows: int, path: str | Path, scale: int = 2) -> None:
    """images (N, 1, H, W) in [0, 1], row-major, into one grey PNG."""
    n, _, h, w = images.shape
    cols = n // rows
    grid = images[: rows * cols, 0].reshape(rows, cols, h, w).permute(0, 2, 1, 3).reshape(rows * h, cols * w)
    img = PIL.Image.fromarray((grid.numpy() * 255).round().astype(np.uint8), mode="L")
    img.resize((cols * w * scale, rows * h * scale), PIL.Image.NEAREST).save(path, optimize=True)


def evaluate(pipe, per_class: int, steps: int, guidance: float, seed: int) -> tuple[dict, torch.Tensor]:
    labels = [d for d in range(pipe.num_classes) for _ in range(per_class)]
    t0 = time.perf_counter()
    images = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                  generator=torch.Generator().manual_seed(seed)).images
    seconds = time.perf_counter() - t0
    pred = load_digit_classifier().score(images)
    acc = (pred == torch.tensor(labels)).float().mean().item()
    return {"samples": len(labels), "steps": steps, "guidance_scale": guidance, "seed": seed,
            "class_accuracy": acc, "seconds": seconds}, images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights-dir", type=Path, default=None, help="a train_digits --out folder (default: shipped)")
    p.add_argument("--per-class", type=int, default=5)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", type=Path, default=None, help="write the first guidance scale's samples here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_reference_pipeline(weights_dir=args.weights_dir)
    for i, g in enumerate(args.guidance):
        result, images = evaluate(pipe, args.per_class, args.steps, g, args.seed)
        print(json.dumps(result), flush=True)
        if i == 0 and args.grid is not None:
            save_grid(images, pipe.num_classes, args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
