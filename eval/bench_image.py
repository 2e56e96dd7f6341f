"""``dcache bench``: the baseline and each policy on the same seeds, speed and fidelity side by side.

With no arguments it runs the embedded reference model (class-conditional digits, a real
``FluxTransformer2DModel``), so it works on a fresh machine without downloads.

    dcache bench                                   # embedded model, default policies
    dcache bench --policies "taylorseer(interval=6),fbcache(threshold=0.1)" --steps 50
    dcache bench --peers                           # + diffusers' hooks and cache-dit on the same model
    dcache bench --model ./my-dit-pipeline --num-samples 4

Each configuration runs twice: once under torch's FLOP counter (gives ``computed_fraction``:
matmul FLOPs executed / the baseline's; also the warm-up) and once timed without it. Rows are appended to ``OUT/results.json`` as they finish; a rerun
with ``--resume`` skips the rows already there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

import dcache
from dcache.eval import policy_spec

# On the embedded model at 50 steps these span ~2.3x to ~3x. taylorseer(interval=6) computes as
# many steps (11 of 50) as the diffusers TaylorSeerCache peer; the fbcache threshold matches the
# FirstBlockCache / DBCache peers.
DEFAULT_POLICIES = (
    "static(interval=3),teacache(threshold=0.6),fbcache(threshold=0.2),"
    "taylorseer(interval=5),taylorseer(interval=6)"
)


def parse_policies(spec: str) -> list[tuple[str, dict]]:
    """``"a,b(k=v,k2=v2)"`` → [("a", {}), ("b", {"k": v, "k2": v2})]; image policies only."""
    return policy_spec.parse_policies(spec, task="image")


@dataclass
class Target:
    """A pipeline plus how to call it for N samples and how to score them."""

    pipe: Any
    name: str
    generate: Callable[[list[int], int], torch.Tensor]  # (seeds, steps) -> images (N, C, H, W) in [0, 1]
    labels: Callable[[list[int]], list[int]] | None = None
    classify: Callable[[torch.Tensor], torch.Tensor] | None = None
    separate_cfg: bool = True


def _as_images(out: Any) -> torch.Tensor:
    x = getattr(out, "images", None)
    if x is None:
        x = getattr(out, "frames", None)
    if x is None:
        x = out[0]
    x = torch.as_tensor(x).float().cpu()
    if x.ndim == 5:  # video (B, F, C, H, W): frames become samples
        x = x.flatten(0, 1)
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    return x


def embedded_target(guidance: float, device: str, weights_dir: str | None = None) -> Target:
    from dcache.pipelines.zoo.digit_classifier import load_digit_classifier
    from dcache.pipelines.zoo.reference import load_reference_pipeline

    pipe = load_reference_pipeline(device=device, weights_dir=weights_dir)
    pipe.set_progress_bar_config(disable=True)
    clf = load_digit_classifier(device=device)

    def labels(seeds: list[int]) -> list[int]:
        return [s % 10 for s in seeds]

    def generate(seeds: list[int], steps: int) -> torch.Tensor:
        gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        out = pipe(class_labels=labels(seeds), num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="pt")
        return _as_images(out)

    return Target(pipe, "embedded digits (FluxTransformer2DModel)", generate, labels, clf.score)


def model_target(model: str, guidance: float, device: str, prompt: str) -> Target:
    import inspect

    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model).to(device)
    except Exception as e:  # noqa: BLE001 - report any loading failure the same way
        raise ValueError(f"cannot load a diffusers pipeline from {model!r}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    params = inspect.signature(type(pipe).__call__).parameters

    def generate(seeds: list[int], steps: int) -> torch.Tensor:
        kw: dict[str, Any] = {"num_inference_steps": steps, "output_type": "pt",
                              "generator": [torch.Generator(device).manual_seed(s) for s in seeds]}
        if "guidance_scale" in params:
            kw["guidance_scale"] = guidance
        if "class_labels" in params:
            kw["class_labels"] = [s % 10 for s in seeds]
        elif "prompt" in params:
            kw["prompt"] = [prompt] * len(seeds)
        return _as_images(pipe(**kw))

    return Target(pipe, f"{type(pipe).__name__} from {model}", generate)


def _time(target: Target, seeds: list[int], steps: int, before: Callable[[], None]) -> tuple[torch.Tensor, float]:
    before()
    t0 = time.perf_counter()
    with torch.no_grad():
        images = target.generate(seeds, steps)
    return images, time.perf_counter() - t0


def _measure(target: Target, seeds: list[int], steps: int, before: Callable[[], None],
             repeats: int = 1) -> tuple[torch.Tensor, float, float]:
    """(images, wall seconds, FLOPs): a counted run (also the warm-up), then the timed run.

    FLOPs are counted at the dispatcher, so a module whose forward was replaced by any cache
    (dcache's, diffusers', cache-dit's) is counted only when its matmuls really run.
    """
    from torch.utils.flop_counter import FlopCounterMode

    before()
    with FlopCounterMode(display=False) as counter:
        target.generate(seeds, steps)
    flops = float(counter.get_total_flops())
    # The fastest of the timed repeats: other load on the machine only ever adds time.
    runs = [_time(target, seeds, steps, before) for _ in range(repeats)]
    return runs[0][0], min(t for _, t in runs), flops


def _slug(source: str, policy: str, options: dict) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{source}-{policy}-{json.dumps(options, sort_keys=True)}")[:120]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dcache bench", description="Benchmark caching policies against the uncached baseline.")
    ap.add_argument("--task", default="image", help="image (this benchmark), dllm or ar-video (see their --help)")
    ap.add_argument("--model", default=None, help="hub id or local directory of a diffusers pipeline (default: embedded)")
    ap.add_argument("--weights-dir", default=None, help="embedded model: a train_digits --out folder instead of the shipped weights")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help="comma list, options in parentheses")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--num-samples", type=int, default=10, help="samples per configuration (seeds 0..N-1)")
    ap.add_argument("--seeds", default=None, help="explicit comma list of seeds (overrides --num-samples)")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--prompt", default="a photo of a cat", help="prompt for text-to-image models")
    ap.add_argument("--peers", action="store_true", help="also run diffusers' hooks and cache-dit")
    ap.add_argument("--out", default="dcache-bench", help="output directory")
    ap.add_argument("--resume", action="store_true", help="skip rows already in OUT/results.json")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (the fastest counts)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.steps < 2:
        ap.error("--steps must be at least 2")
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            ap.error(f"--seeds must be a comma list of integers, got {args.seeds!r}")
    else:
        if args.num_samples < 1:
            ap.error("--num-samples must be at least 1")
        seeds = list(range(args.num_samples))
    try:
        policies = parse_policies(args.policies)
    except ValueError as e:
        ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)

    from tqdm.auto import tqdm

    from dcache.eval import metrics, report

    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    target = (embedded_target(args.guidance, args.device, args.weights_dir) if args.model is None
              else model_target(args.model, args.guidance, args.device, args.prompt))
    meta = {"model": args.model or "embedded", "steps": args.steps, "seeds": seeds, "guidance": args.guidance,
            "torch_threads": torch.get_num_threads(), "device": args.device}
    results_path = os.path.join(args.out, "results.json")
    done: dict[str, dict] = {}
    if args.resume and os.path.exists(results_path):
        old_meta_path = os.path.join(args.out, "meta.json")
        old_meta = json.load(open(old_meta_path)) if os.path.exists(old_meta_path) else {}
        if all(old_meta.get(k) == meta[k] for k in ("model", "steps", "seeds", "guidance")):
            done = {r["id"]: r for r in json.load(open(results_path))}
        else:
            print("--resume: settings differ from the earlier run; starting over", file=sys.stderr)

    lp_ok, lp_note = metrics.lpips_status()
    notes = [] if lp_ok else [lp_note]
    jobs: list[tuple[str, str, dict, Callable[[], tuple[Callable, Callable]]]] = []
    for name, opts in policies:
        jobs.append(("dcache", name, opts, lambda n=name, o=opts: _dcache_setup(target.pipe, n, o)))
    if args.peers:
        from dcache.eval.peers import available_peers

        peers, peer_notes = available_peers(lambda p, s: target.generate(seeds[:2], s), target.separate_cfg)
        notes += peer_notes
        for peer in peers:
            jobs.append((peer.source, peer.name, peer.options,
                         lambda pr=peer: pr.setup(target.pipe, args.steps)))

    rows: list[dict] = []
    ran_new = False  # anything timed in this invocation (a fully resumed run re-times nothing)
    grid_rows: list[tuple[str, torch.Tensor]] = []
    bar = tqdm(total=len(jobs) + 1, desc="dcache bench", unit="run")
    base_id = _slug("baseline", "baseline", {})
    base_file = os.path.join(args.out, "images", base_id + ".pt")
    if base_id in done and os.path.exists(base_file):
        base_row, base = done[base_id], torch.load(base_file)
    else:
        base, wall, flops = _measure(target, seeds, args.steps, lambda: None, args.repeats)
        ran_new = True
        torch.save(base, base_file)
        base_row = {"id": base_id, "source": "baseline", "policy": "baseline", "label": "baseline", "options": {},
                    "wall_s": wall,
                    "speedup": 1.0, "computed_fraction": 1.0, "flops": flops, "psnr": float("inf"),
                    "ssim": 1.0, "lpips": 0.0 if lp_ok else None}
        if target.classify is not None:
            base_row["class_accuracy"] = _accuracy(target, base, seeds)
    rows.append(base_row)
    grid_rows.append(("baseline", base))
    report.write_json(results_path, rows, dict(meta, notes=notes))
    bar.update(1)

    for source, name, opts, setup in jobs:
        rid = _slug(source, name, opts)
        img_file = os.path.join(args.out, "images", rid + ".pt")
        bar.set_postfix_str(f"{source}:{name}")
        if rid in done and os.path.exists(img_file):
            row, images = done[rid], torch.load(img_file)
        else:
            try:
                before, teardown = setup()
            except Exception as e:  # noqa: BLE001 - a peer that cannot run on this model is reported, not fatal
                notes.append(f"{source} {name} skipped: {type(e).__name__}: {e}")
                bar.update(1)
                continue
            try:
                images, wall, flops = _measure(target, seeds, args.steps, lambda: before(target.pipe), args.repeats)
                ran_new = True
            finally:
                teardown(target.pipe)
            torch.save(images, img_file)
            row = {"id": rid, "source": source, "policy": name, "label": report.label(name, opts), "options": opts,
                   "wall_s": wall,
                   "speedup": base_row["wall_s"] / wall, "computed_fraction": flops / base_row["flops"],
                   "flops": flops, "psnr": metrics.psnr(images, base), "ssim": metrics.ssim(images, base),
                   "lpips": metrics.lpips_distance(images, base)}
            if target.classify is not None:
                row["class_accuracy"] = _accuracy(target, images, seeds)
        rows.append(row)
        grid_rows.append((row["label"] if source == "dcache" else f"{source}:{name}", images))
        report.write_json(results_path, rows, dict(meta, notes=notes))
        bar.update(1)
    if ran_new and len(rows) > 1:
        # Time the baseline once more at the end, so a slow start (or a quiet end) of the
        # machine does not tilt every speedup the same way.
        _, again = _time(target, seeds, args.steps, lambda: None)
        base_row["wall_s"] = min(base_row["wall_s"], again)
        for r in rows[1:]:
            r["speedup"] = base_row["wall_s"] / r["wall_s"]
        report.write_json(results_path, rows, dict(meta, notes=notes))
    bar.close()

    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report.markdown(rows) + "\n")
    report.grid(os.path.join(args.out, "grid.png"), grid_rows)
    report.pareto(os.path.join(args.out, "pareto.png"), rows)
    print(f"\n{target.name}, {args.steps} steps, {len(seeds)} samples, guidance {args.guidance}, "
          f"{torch.get_num_threads()} CPU threads")
    print(report.table(rows))
    for n in notes:
        print(f"note: {n}")
    print(f"\nwrote {results_path}, results.md, grid.png, pareto.png in {args.out}")
    return 0


def _dcache_setup(pipe: Any, name: str, opts: dict) -> tuple[Callable, Callable]:
    dcache.accelerate(pipe, name, **opts)
    return (lambda p: None), dcache.disable


def _accuracy(target: Target, images: torch.Tensor, seeds: list[int]) -> float:
    pred = target.classify(images)
    labels = torch.tensor(target.labels(seeds))
    return float((pred == labels).float().mean())


if __name__ == "__main__":
    raise SystemExit(main())
