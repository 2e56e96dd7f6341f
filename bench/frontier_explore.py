"""Fidelity-only sweep on the embedded scenes model: PSNR / SSIM / computed FLOPs per configuration.

No timing (``dcache bench`` times the configurations this sweep picks): every configuration runs
once under torch's FLOP counter on the same seeds and is compared with the uncached baseline.
Rows are appended to ``--out`` as JSON lines as they finish, so a long sweep can be read while
it runs. Configurations use ``dcache bench``'s syntax (``a(k=v)``, ``a+b``), one per ``;``, and
``--peers`` adds diffusers' and cache-dit's caches on the same seeds.

    OMP_NUM_THREADS=1 python bench/frontier_explore.py --seeds 0,1,2,3 --out /tmp/sweep.jsonl \\
        --configs "static(interval=5);static(interval=5,residual_order=1)"
"""

from __future__ import annotations

import argparse
import time

import torch
from _rows import emit  # bench/ is on sys.path when a bench script runs

from dcache.eval import bench_image, metrics, policy_spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", required=True, help="';'-separated dcache bench policy specs")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--peers", action="store_true")
    ap.add_argument("--out", required=True, help="JSON-lines file the rows are appended to")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    specs = [c.strip() for c in args.configs.split(";") if c.strip()]
    try:  # bad specs fail before any run, as one line
        parsed = [policy_spec.parse_policies(c, task="image")[0] for c in specs]
    except ValueError as e:
        ap.error(str(e))

    target = bench_image.make_target("scenes", args.guidance, "cpu")
    base, base_flops = bench_image._count(target, seeds, args.steps, lambda: None)
    jobs = [(spec, "dcache", lambda n=n, o=o: bench_image._dcache_setup(target.pipe, n, o))
            for spec, (n, o) in zip(specs, parsed)]
    if args.peers:
        from dcache.eval.peers import available_peers

        for peer in available_peers(lambda p, s: target.generate(seeds[:2], s), target.separate_cfg)[0]:
            jobs.append((f"{peer.name}({peer.options})", peer.source, lambda pr=peer: pr.setup(target.pipe, args.steps)))
    for spec, source, setup in jobs:
        t0 = time.perf_counter()
        try:
            before, teardown = setup()
        except Exception as e:  # noqa: BLE001 - a peer that cannot run here is reported
            print(f"{spec}: skipped ({type(e).__name__}: {e})", flush=True)
            continue
        try:
            images, flops = bench_image._count(target, seeds, args.steps, lambda: before(target.pipe))
        finally:
            teardown(target.pipe)
        row = {"config": spec, "source": source, "seeds": seeds, "computed": flops / base_flops,
               "psnr": metrics.psnr(images, base), "ssim": metrics.ssim(images, base),
               "seconds": time.perf_counter() - t0}
        emit(row, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
