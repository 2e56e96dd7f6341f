"""Whole-prompt and per-attribute adherence of the scenes model (or of the generator itself).

    python -m dcache.pipelines.zoo.scenes.evaluate --n 200 --steps 50 --guidance 4
    python -m dcache.pipelines.zoo.scenes.evaluate --ground-truth --n 2000
    python -m dcache.pipelines.zoo.scenes.evaluate --n 16 --grid pipelines/zoo/scenes/scenes_samples.png

Prompts are ``sample_prompts(n, seed)``; sample i starts from ``torch.Generator().manual_seed(i)``.
"""
from __future__ import annotations

import argparse
import json
import random

import numpy as np
import torch

from .checker import check_adherence
from .grammar import parse_prompt, sample_prompts


def summarise(results: list[dict]) -> dict[str, float]:
    """Rates of each attribute over the images where it applies."""
    out: dict[str, list[bool]] = {"whole": [], "background": [], "count": [], "relation": [],
                                  "colour": [], "shape": [], "size": []}
    for r in results:
        for k in ("whole", "background", "count"):
            out[k].append(bool(r[k]))
        if r["relation"] is not None:
            out["relation"].append(bool(r["relation"]))
        for o in r["objects"]:
            for k in ("colour", "shape", "size"):
                out[k].append(bool(o[k]))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in out.items()}


def save_grid(path: str, images: torch.Tensor, prompts: list[str], results: list[dict], cols: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, p, r in zip(axes.flat, images, prompts, results):
        ax.imshow(im.permute(1, 2, 0).numpy(), interpolation="nearest")
        short = p.replace(" background", "").replace("a ", "")
        words = short.split()
        half = (len(words) + 1) // 2
        ax.set_title(" ".join(words[:half]) + "\n" + " ".join(words[half:]) + ("" if r["whole"] else "\n(x)"),
                     fontsize=6, color="black" if r["whole"] else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=2024, help="prompt seed")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ground-truth", action="store_true", help="check the generator's own images instead")
    ap.add_argument("--grid", default=None, help="write the samples with their prompts to this PNG")
    ap.add_argument("--json", default=None, help="write the summary to this file")
    ap.add_argument("--stochastic-sampling", action="store_true",
                    help="sample with FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) instead of Euler")
    args = ap.parse_args(argv)
    if args.n < 1 or args.steps < 1 or args.batch < 1:
        ap.error("--n, --steps and --batch must be at least 1")
    torch.set_num_threads(args.threads)
    prompts = sample_prompts(args.n, seed=args.seed)
    if args.ground_truth:
        from .render import render_scene

        rng = random.Random(args.seed)
        images = torch.from_numpy(np.stack([render_scene(parse_prompt(p), rng)[0] for p in prompts])).permute(0, 3, 1, 2)
    else:
        from .loader import load_scenes_pipeline

        pipe = load_scenes_pipeline(weights_dir=args.weights_dir, stochastic_sampling=args.stochastic_sampling)
        pipe.set_progress_bar_config(disable=True)
        chunks = []
        for i in range(0, args.n, args.batch):
            chunk = prompts[i:i + args.batch]
            gens = [torch.Generator().manual_seed(i + j) for j in range(len(chunk))]
            chunks.append(pipe(chunk, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens,
                               output_type="pt").images)
        images = torch.cat(chunks)
    results = check_adherence(images, prompts)
    summary = dict(summarise(results), n=args.n, steps=args.steps, guidance=args.guidance,
                   sampler="stochastic" if args.stochastic_sampling else "euler",
                   source="ground truth" if args.ground_truth else (args.weights_dir or "shipped weights"))
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if args.grid:
        save_grid(args.grid, images, prompts, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
