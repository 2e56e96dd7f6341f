"""``dcache bench --task dllm``: dLLM KV policies against the uncached sampler on the reference model.

For every generation length and batch size, each policy generates the same held-out cipher
problems as the vanilla sampler (LLaDA low-confidence remasking, one token per step, block 32).
Rows: policy, gen_length, batch, accuracy (exact match of the whole canvas), tokens_per_s
(generated canvas tokens / wall time), speedup (over vanilla at the same length and batch, measured
in the same run), nfe (forwards per generation), token_fraction (token-forwards computed / full).
Results go to ``OUT/results.json``; a table is printed.

Example::

    dcache bench --task dllm --batch-sizes 1 8 32 --gen-lengths 64 128 --out out/bench_dllm
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

# name → (policy name or None, options, sampler threshold when no policy)
POLICY_SPECS: dict[str, tuple[str | None, dict[str, Any], float | None]] = {
    "vanilla": (None, {}, None),
    "parallel": (None, {}, 0.9),
    "dkv-decode": ("dkv", {"variant": "decode", "refresh_interval": 8}, None),
    "dkv-pd": ("dkv", {"variant": "pd", "refresh_interval": 8}, None),
    "dkv-prefill": ("dkv", {"variant": "prefill"}, None),
    "prefix-cache": ("prefix-cache", {"threshold": None}, None),
    "dual-cache": ("dual-cache", {"threshold": None}, None),
    "prefix-cache+parallel": ("prefix-cache", {"threshold": 0.9}, None),
    "dual-cache+parallel": ("dual-cache", {"threshold": 0.9}, None),
    "elastic": ("elastic", {}, None),
    "elastic-fixed": ("elastic", {"threshold": None}, None),
    # a stricter threshold keeps several steps per block, so the cache's own share shows
    "parallel@0.999": (None, {}, 0.999),
    "dual-cache+parallel@0.999": ("dual-cache", {"threshold": 0.999}, None),
}
DEFAULT_POLICIES = ["vanilla", "dkv-decode", "dkv-pd", "prefix-cache", "dual-cache", "parallel",
                    "dual-cache+parallel", "prefix-cache+parallel", "elastic"]


def default_model_dir() -> str:
    import dcache.pipelines.zoo as zoo

    return os.path.join(os.path.dirname(zoo.__file__), "dllm_cipher")


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dcache bench --task dllm", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the shipped reference model)")
    ap.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES, help=f"from {sorted(POLICY_SPECS)}")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--gen-lengths", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--problems", type=int, default=64, help="problems per (length, batch) cell; batch 1 uses --problems-b1")
    ap.add_argument("--problems-b1", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/bench_dllm")
    ap.add_argument("--seed", type=int, default=777)
    return ap


def _run_policy(model, name, prompts, bs, gen_len, block, generator_seed):
    import dcache
    from dcache.pipelines.dllm.generate import llada_generate

    pol, opts, thr = POLICY_SPECS[name]
    if pol is not None:
        dcache.accelerate(model, policy=pol, **opts)
    outs, nfe, frac_num, frac_den = [], 0, 0.0, 0
    try:
        t0 = time.perf_counter()
        for i in range(0, prompts.shape[0], bs):
            o = llada_generate(model, prompts[i:i + bs], gen_length=gen_len, block_length=block, steps=gen_len,
                               threshold=thr)
            outs.append(o.sequences)
            nfe += o.nfe
        if prompts.is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if pol is not None:
            st = model.dcache.stats()
            frac = st["token_fraction_computed"]
        else:
            frac = 1.0 if thr is None else 1.0
    finally:
        if pol is not None:
            dcache.disable(model)
    n_batches = (prompts.shape[0] + bs - 1) // bs
    return torch.cat(outs), dt, nfe / n_batches, frac


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from tqdm import tqdm

    from dcache.pipelines.dllm import tasks
    from dcache.pipelines.dllm.modeling import LLaDAModelLM

    unknown = [p for p in args.policies if p not in POLICY_SPECS]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; accepted: {sorted(POLICY_SPECS)}")
    torch.set_num_threads(args.threads)
    model_dir = args.model or default_model_dir()
    model = LLaDAModelLM.from_pretrained(model_dir, device=args.device)
    os.makedirs(args.out, exist_ok=True)
    policies = ["vanilla"] + [p for p in args.policies if p != "vanilla"]
    cells = [(g, b) for g in args.gen_lengths for b in args.batch_sizes]
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(cells) * len(policies), desc="bench dllm")
    for gen_len, bs in cells:
        count = args.problems_b1 if bs == 1 else max(args.problems, bs)
        count = (count // bs) * bs
        prompts, answers = tasks.make_problems(count, gen_length=gen_len,
                                               n_range=(gen_len * 3 // 4, min(gen_len, tasks.FIELD)),
                                               seed=args.seed + gen_len)
        prompts = prompts.to(args.device)
        # warm-up so the first timed policy does not pay allocator / thread start-up costs
        _run_policy(model, "vanilla", prompts[:bs], bs, gen_len, args.block_length, 0)
        base_tps = None
        for name in policies:
            bar.set_postfix_str(f"L={gen_len} B={bs} {name}")
            try:
                seqs, dt, nfe, frac = _run_policy(model, name, prompts, bs, gen_len, args.block_length, 0)
            except ValueError as e:  # e.g. a policy not available in this build
                tqdm.write(f"skip {name}: {e}")
                bar.update(1)
                continue
            tps = count * gen_len / dt
            if name == "vanilla":
                base_tps = tps
            rows.append({
                "policy": name, "gen_length": gen_len, "batch": bs, "problems": count,
                "accuracy": round(tasks.exact_match(seqs, answers), 4), "tokens_per_s": round(tps, 1),
                "speedup": round(tps / base_tps, 2) if base_tps else None, "nfe": round(nfe, 1),
                "token_fraction": round(frac, 3), "seconds": round(dt, 2),
            })
            bar.update(1)
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(rows, f, indent=1)
    bar.close()
    _print_table(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown_table(rows))
    targets = issue_targets(rows)
    for t in targets:
        print(f"target {t['check']} at L={t['gen_length']} B={t['batch']}: speedup {t['speedup']}x "
              f"(need >= {t['need_speedup']}), accuracy {t['accuracy']} vs vanilla {t['vanilla_accuracy']} -> "
              f"{'PASS' if t['pass'] else 'FAIL'}")
    meta = {"targets": targets, "model": model_dir, "device": args.device, "threads": args.threads, "torch": torch.__version__,
            "block_length": args.block_length, "steps": "gen_length (one token per step for fixed-count samplers)"}
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {os.path.join(args.out, 'results.json')}")
    return 0


def issue_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets at the longest generation length: dual cache + parallel decoding >= 4x
    at accuracy within 1 point of vanilla; dkv-decode >= 1.5x at accuracy not below vanilla."""
    if not rows:
        return []
    L = max(r["gen_length"] for r in rows)
    out = []
    for bs in sorted({r["batch"] for r in rows if r["gen_length"] == L}):
        cell = {r["policy"]: r for r in rows if r["gen_length"] == L and r["batch"] == bs}
        van = cell.get("vanilla")
        for name, need, tol in (("dual-cache+parallel", 4.0, 0.01), ("dkv-decode", 1.5, 0.0)):
            r = cell.get(name)
            if van is None or r is None:
                continue
            ok = r["speedup"] >= need and r["accuracy"] >= van["accuracy"] - tol - 1e-9
            out.append({"check": name, "gen_length": L, "batch": bs, "speedup": r["speedup"], "need_speedup": need,
                        "accuracy": r["accuracy"], "vanilla_accuracy": van["accuracy"], "pass": ok})
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = ["gen_length", "batch", "policy", "accuracy", "tokens_per_s", "speedup", "nfe", "token_fraction"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _print_table(rows: list[dict[str, Any]]) -> None:
    cols = ["gen_length", "batch", "policy", "accuracy", "tokens_per_s", "speedup", "nfe", "token_fraction"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


if __name__ == "__main__":
    raise SystemExit(main())
