"""Caching on the scenes model's Euler sampler and on its stochastic one, same weights and seeds.

``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` re-noises the model's clean
estimate with fresh noise at every step. It helped less-trained scenes weights (on the shipped
ones it is a wash; pipelines/zoo/README.md, "Sampler"), but a cache that reuses a velocity
computed for the previous step's noise puts the difference of the two noises into the clean
estimate. This script measures both: for each sampler, the uncached baseline and a few
policies, with whole-prompt adherence, shape rate and PSNR against that sampler's own baseline
(the mean per-sample PSNR, as ``dcache bench`` reports it). Quality only (no timing). Results go
to ``--out``/results.json and results.md.

    OMP_NUM_THREADS=1 python bench/stochastic_sampling.py --num-samples 32 --out bench/results/stochastic
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

POLICIES = "static(interval=3),taylorseer,static(interval=25)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=32, help="seeds 0..N-1; seed s draws prompt s (as dcache bench)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--policies", default=POLICIES, help="dcache policies, as dcache bench --policies takes them")
    ap.add_argument("--weights-dir", default=None, help="scenes weights (default: the shipped ones)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.num_samples < 1 or args.steps < 1:
        ap.error("--num-samples and --steps must be at least 1")

    from dcache.eval.bench_image import _dcache_setup, scene_prompts
    from dcache.eval.metrics import psnr
    from dcache.eval.policy_spec import parse_policies
    from dcache.eval.report import label
    from dcache.pipelines.zoo.scenes import check_adherence, load_scenes_pipeline
    from dcache.pipelines.zoo.scenes.evaluate import summarise

    try:
        specs = parse_policies(args.policies)
    except ValueError as e:  # before any model call
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    prompts = scene_prompts(list(range(args.num_samples)))
    rows = []
    for sampler in ("euler", "stochastic"):
        pipe = load_scenes_pipeline(weights_dir=args.weights_dir, stochastic_sampling=sampler == "stochastic")
        pipe.set_progress_bar_config(disable=True)
        base = None
        for spec in [("baseline", {})] + specs:
            teardown = _dcache_setup(pipe, *spec)[1] if spec[0] != "baseline" else None
            try:
                images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="pt",
                              generator=[torch.Generator().manual_seed(s) for s in range(args.num_samples)]).images
            finally:
                if teardown is not None:
                    teardown(pipe)
            base = images if base is None else base
            s = summarise(check_adherence(images, prompts))
            rows.append({"sampler": sampler, "policy": label(*spec), "adherence": s["whole"], "shape": s["shape"],
                         "psnr": psnr(images, base)})
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"num_samples": args.num_samples, "steps": args.steps, "guidance": args.guidance,
            "weights": args.weights_dir or "shipped", "threads": args.threads,
            "command": "python bench/stochastic_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| sampler | policy | adherence | shape | PSNR dB |", "|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['policy']} | {r['adherence']:.3f} | {r['shape']:.3f} | "
              f"{'inf' if math.isinf(r['psnr']) else format(r['psnr'], '.1f')} |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
