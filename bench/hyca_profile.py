"""Write a HyCa profile for the embedded scenes model: one profile run (every step computed).

    OMP_NUM_THREADS=1 python bench/hyca_profile.py --out bench/results/foca/profiles/hyca_i6_w3.json \
        --interval 6 --warmup-steps 3 --seeds 100,101,102,103

The seeds should not be the bench's (0..N-1), so the profile is not measured on the images it is
judged on.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import dcache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--seeds", default="100,101,102,103")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=4.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from dcache.eval.bench_image import make_target

    target = make_target("scenes", args.guidance, "cpu")
    seeds = [int(s) for s in args.seeds.split(",")]
    with dcache.accelerated(target.pipe, "hyca", profile_out=args.out, interval=args.interval,
                            warmup_steps=args.warmup_steps, group_size=args.group_size):
        target.generate(seeds, args.steps)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
