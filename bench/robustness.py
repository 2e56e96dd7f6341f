"""Is a policy/baseline speed ratio robust to a busy machine? (issue #10: within 15% of a quiet run)

Measures the ratio twice on the embedded scenes model, each time interleaved (baseline, policy,
policy, baseline, ... so a load that drifts during a phase falls on both alike):

* ``as_is``: on the machine as it is (the quiet reference when nothing else runs);
* ``loaded``: with ``--load-procs`` busy-loop processes running alongside, a known CPU load.

Each round times one baseline and one policy generation back to back; the round's ratio is
baseline / policy, and a phase reports the median of its rounds' ratios (with min and max) and
the ratio of the median times. ``relative_difference`` = |loaded / as_is - 1| of the paired
medians; ``within_15pct`` says whether it is at most 0.15. Results go to ``--out``/robustness.json.

    OMP_NUM_THREADS=1 python bench/robustness.py --policy "static(budget=10,warmup_steps=2,level=output)" \\
        --threads 1 --num-samples 4 --rounds 5 --load-procs 2 --out bench/results/robustness
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

# A known load: one pure-Python busy loop per process, at the benchmark's own priority.
_BUSY = "while True:\n    pass\n"


def _phase(target, seeds, steps, policy, opts, rounds):
    from dcache.eval import bench_image

    def one(cached: bool) -> float:
        teardown = bench_image._dcache_setup(target.pipe, policy, opts)[1] if cached else None
        try:
            return bench_image._time(target, seeds, steps, lambda: None)[1]
        finally:
            if teardown is not None:
                teardown(target.pipe)

    base, pol, ratios = [], [], []
    for r in range(rounds):
        order = (False, True) if r % 2 == 0 else (True, False)  # ABBA: a drift within a round cancels
        t = {c: one(c) for c in order}
        base.append(t[False])
        pol.append(t[True])
        ratios.append(t[False] / t[True])
    return {"baseline_s": base, "policy_s": pol, "round_ratios": ratios,
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_of_medians": statistics.median(base) / statistics.median(pol),
            "loadavg_end": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="policy/baseline speed ratio as is and under a known CPU load")
    ap.add_argument("--policy", default="taylorseer", help="a dcache bench policy spec, e.g. 'static(interval=8)'")
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--load-procs", type=int, default=2, help="busy-loop processes in the loaded phase")
    ap.add_argument("--skip-loaded", action="store_true", help="measure the as-is phase only")
    ap.add_argument("--out", default="bench/results/robustness")
    args = ap.parse_args(argv)
    for name in ("num_samples", "steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.load_procs < 0:
        ap.error("--load-procs must be >= 0")
    from dcache.eval import bench_image

    try:
        (policy, opts), = bench_image.parse_policies(args.policy)
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    target = bench_image.make_target("scenes", 4.0, "cpu")
    seeds = list(range(args.num_samples))
    with torch.no_grad():  # warm-up: first-call costs (FLOP tables, allocator) stay out of the timings
        target.generate(seeds[:1], 2)
    result = {"policy": args.policy, "threads": args.threads, "samples": args.num_samples, "steps": args.steps,
              "rounds": args.rounds, "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()[0]}
    result["as_is"] = _phase(target, seeds, args.steps, policy, opts, args.rounds)
    if not args.skip_loaded:
        procs = [subprocess.Popen([sys.executable, "-c", _BUSY]) for _ in range(args.load_procs)]
        try:
            time.sleep(1.0)
            result["loaded"] = _phase(target, seeds, args.steps, policy, opts, args.rounds)
        finally:
            for p in procs:
                p.kill()
                p.wait()
        result["load_procs"] = args.load_procs
        diff = abs(result["loaded"]["ratio"] / result["as_is"]["ratio"] - 1)
        result["relative_difference"] = diff
        result["within_15pct"] = diff <= 0.15
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "robustness.json"), "w") as f:
        json.dump(result, f, indent=1)
    for phase in ("as_is", "loaded"):
        if phase in result:
            p = result[phase]
            print(f"{phase:7s} ratio {p['ratio']:.3f} (rounds {p['ratio_min']:.3f}-{p['ratio_max']:.3f}; "
                  f"ratio of medians {p['ratio_of_medians']:.3f}), load average at end {p['loadavg_end']:.1f}")
    if "relative_difference" in result:
        print(f"relative difference {result['relative_difference']:.3f} "
              f"({'within' if result['within_15pct'] else 'outside'} 15%), {args.threads} torch thread(s), "
              f"{args.load_procs} busy-loop process(es)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
