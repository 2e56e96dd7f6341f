"""Open-loop forecast error along the uncached trajectory, per level, on the embedded scenes model.

Records, for every step of the conditional branch of uncached runs: the model output (velocity),
the residual of the whole block chain (last block's hidden output minus the first block's hidden
input: what ``static`` reuses) and one attention output and one MLP output (what ``taylorseer``
forecasts). For an anchor step a computed after a gap N (the previous computed step a - N), it
forecasts steps a + k, k = 1..N-1, by reuse (F_a) and by first-order Taylor
(F_a + k (F_a - F_{a-N}) / N), and reports the mean relative L2 error of each over all anchors
a >= 3 and seeds, plus the share of forecasts where Taylor beats reuse. Also writes how the
velocity's step-to-step change is spread over the loop (where the trajectory bends).

    OMP_NUM_THREADS=1 python bench/forecast_levels.py --seeds 0,1,2,3 --out bench/results/frontier/forecast_levels.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def record(target, seeds, steps):
    tr = target.pipe.transformer
    blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    rec = {"velocity": [], "chain_in": [], "chain_out": [], "attn": [], "mlp": []}
    calls = {"n": 0}

    def first_in(m, a, k):
        rec["chain_in"].append((k["hidden_states"] if "hidden_states" in k else a[0]).detach().clone())

    def last_out(m, a, o):
        rec["chain_out"].append((o[1] if isinstance(o, tuple) else o).detach().clone())

    hooks = [blocks[0].register_forward_pre_hook(first_in, with_kwargs=True),
             blocks[-1].register_forward_hook(last_out),
             tr.register_forward_hook(lambda m, a, o: rec["velocity"].append((o[0] if isinstance(o, tuple) else o.sample).detach().clone())),
             tr.transformer_blocks[1].attn.register_forward_hook(lambda m, a, o: rec["attn"].append(o[0].detach().clone())),
             tr.transformer_blocks[1].ff.register_forward_hook(lambda m, a, o: rec["mlp"].append(o.detach().clone()))]
    try:
        with torch.no_grad():
            target.generate(seeds, steps)
    finally:
        for h in hooks:
            h.remove()
    # two calls per step (cond, uncond): keep the conditional branch
    out = {"residual": [o - i for o, i in zip(rec["chain_out"][0::2], rec["chain_in"][0::2])]}
    for k in ("velocity", "attn", "mlp"):
        out[k] = rec[k][0::2]
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm())


def errors(traj, gaps):
    res = {}
    n = len(traj)
    for gap in gaps:
        reuse, taylor, wins = [], [], 0
        for a in range(3, n - 1):
            if a - gap < 2:
                continue
            f_a, f_p = traj[a].double(), traj[a - gap].double()
            d = (f_a - f_p) / gap
            for k in range(1, gap):
                if a + k >= n:
                    break
                true = traj[a + k].double()
                e_r, e_t = rel(f_a, true), rel(f_a + k * d, true)
                reuse.append(e_r)
                taylor.append(e_t)
                wins += e_t < e_r
        if reuse:
            res[gap] = {"reuse": sum(reuse) / len(reuse), "taylor1": sum(taylor) / len(taylor),
                        "taylor_wins": wins / len(reuse)}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--gaps", default="2,3,4,5,6,8,10")
    ap.add_argument("--out", default="bench/results/frontier/forecast_levels.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from dcache.eval import bench_image

    target = bench_image.make_target("scenes", 4.0, "cpu")
    gaps = [int(g) for g in args.gaps.split(",")]
    per_level: dict = {}
    bend = None
    for s in [int(x) for x in args.seeds.split(",")]:
        trajs = record(target, [s], args.steps)
        for level, traj in trajs.items():
            for gap, e in errors(traj, gaps).items():
                acc = per_level.setdefault(level, {}).setdefault(gap, {"reuse": 0.0, "taylor1": 0.0, "taylor_wins": 0.0, "n": 0})
                for k in ("reuse", "taylor1", "taylor_wins"):
                    acc[k] += e[k]
                acc["n"] += 1
        v = trajs["residual"]
        change = [rel(v[i + 1], v[i]) for i in range(len(v) - 1)]
        bend = change if bend is None else [b + c for b, c in zip(bend, change)]
    for level in per_level.values():
        for acc in level.values():
            for k in ("reuse", "taylor1", "taylor_wins"):
                acc[k] /= acc["n"]
    nseeds = len(args.seeds.split(","))
    result = {"seeds": args.seeds, "steps": args.steps, "levels": per_level,
              "residual_step_change": [b / nseeds for b in bend]}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("level     gap  reuse  taylor1  taylor wins")
    for level, by_gap in per_level.items():
        for gap, acc in by_gap.items():
            print(f"{level:9s} {gap:3d}  {acc['reuse']:.3f}  {acc['taylor1']:.3f}    {acc['taylor_wins']:.2f}")
    print("residual change per step:", " ".join(f"{c:.3f}" for c in result["residual_step_change"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
