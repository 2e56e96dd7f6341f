"""Write the MagCache ratio table of the embedded scenes model (``scenes_magcache.json``).

One calibration generation (``magcache(calibrate=True)``: every step computed, the per-step ratio
of the block-stack residual's norm measured per guidance branch) on prompts of seeds the bench
does not use (100..103), 50 steps, guidance 4.0 as ``dcache bench``.

    python -m dcache.pipelines.zoo.scenes.calibrate_magcache [--out FILE] [--steps 50]
"""

from __future__ import annotations

import argparse
import os

import torch

import dcache
from dcache.pipelines.zoo.scenes import load_scenes_pipeline, seed_prompts

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "scenes_magcache.json"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=4.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_scenes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    seeds = [100, 101, 102, 103]
    prompts = seed_prompts(seeds)
    dcache.accelerate(pipe, "magcache", calibrate=True, calibration_file=args.out)
    pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
         generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt")
    dcache.disable(pipe)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
