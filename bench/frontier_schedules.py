"""Which computed-step schedule, at a given number of computed steps, keeps the most fidelity?

Fidelity only (PSNR / SSIM against the uncached images of the same seeds, embedded scenes model,
50 steps, CFG 4, one thread). Two sweeps:

* ``family``: ``static(budget=n, warmup_steps=W, ends=a)`` for n in ``--budgets``, W in 2, 3 and
  a in 0, 0.4, 0.8 (plain residual reuse; ``static``'s docstring gives the warp);
* ``uncond``: the conditional branch on ``budget=b`` and the unconditional one on fewer computed
  steps (a CFG-level saving: is the unconditional prediction smoother?).

    OMP_NUM_THREADS=1 python bench/frontier_schedules.py --seeds 0,1,2,3,4,5,6,7 \\
        --out bench/results/frontier/schedules_seeds0-7.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch
from _rows import emit  # bench/ is on sys.path when a bench script runs

import dcache
from dcache.schedulers.static import StaticConfig, StaticPolicy, budget_schedule


class _SplitPolicy(StaticPolicy):
    """``static`` with its own budget for guidance branch 1 (the unconditional call)."""

    def decide(self, state, step, signal):
        if step.branch != 1 or step.num_steps is None:
            return super().decide(state, step, signal)
        c = self.config
        s = step.index
        compute = (state.last_compute is None or step.is_last
                   or s in budget_schedule(step.num_steps, c.uncond_budget, c.warmup_steps, c.ends))
        if compute:
            state.last_compute = s
        return compute


@dataclasses.dataclass
class _SplitConfig(StaticConfig):
    uncond_budget: int = 6

    def build(self, env):
        return _SplitPolicy(self)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--budgets", default="7,8,9,10")
    ap.add_argument("--sweeps", default="family,uncond")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from dcache.eval import bench_image, metrics

    target = bench_image.make_target("scenes", 4.0, "cpu")
    seeds = [int(s) for s in args.seeds.split(",")]
    with torch.no_grad():
        base = target.generate(seeds, 50)
    configs: list[tuple[str, object]] = []
    if "family" in args.sweeps:
        for n, w, a in itertools.product([int(b) for b in args.budgets.split(",")], (2, 3), (0.0, 0.4, 0.8)):
            configs.append((f"static(budget={n},warmup_steps={w},ends={a})", StaticConfig(budget=n, warmup_steps=w, ends=a)))
    if "uncond" in args.sweeps:
        for b, u in ((9, 9), (9, 6), (10, 6), (12, 6), (12, 9)):
            configs.append((f"cond budget {b}, uncond budget {u}", _SplitConfig(budget=b, warmup_steps=2, uncond_budget=u)))
    for name, cfg in configs:
        dcache.accelerate(target.pipe, cfg)
        try:
            with torch.no_grad():
                images = target.generate(seeds, 50)
            stats = target.pipe.dcache.stats()
        finally:
            dcache.disable(target.pipe)
        row = {"config": name, "seeds": seeds, "computed": 1 - stats["flops_avoided_fraction"],
               "psnr": metrics.psnr(images, base), "ssim": metrics.ssim(images, base)}
        emit(row, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
