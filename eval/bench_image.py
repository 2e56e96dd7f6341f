"""``dcache bench``: the baseline and each policy on the same seeds, speed and fidelity side by side.

With no arguments it runs the embedded scenes model (prompt -> 32x32 RGB scene, a real
``FluxTransformer2DModel``), so it works on a fresh machine without downloads; its task score is
whole-prompt adherence read back by an exact opencv checker, a measure that can fail (the default
policies include ``static(interval=25)``, an aggressive cache that should lose it).

    dcache bench                                   # embedded scenes model, default policies
    dcache bench --model digits                    # the class-conditional digits model
    dcache bench --policies "taylorseer(interval=6),fbcache(threshold=0.1)" --steps 50
    dcache bench --peers                           # + diffusers' hooks and cache-dit on the same model
    dcache bench --model ./my-dit-pipeline --num-samples 4

Each configuration first runs once under torch's FLOP counter (gives ``computed_fraction``:
matmul FLOPs executed / the baseline's; the images scored; also the warm-up). Then ``--repeats``
timing rounds run every dcache configuration in turn (baseline, A, B, ..., baseline, A, B, ...),
so load on a shared machine falls on all of them alike; ``wall_s`` is the median,
``wall_min``/``wall_max`` the spread. Peers (``--peers``) are timed ``--repeats`` times right after
their counted run, while installed once. Rows are written to ``OUT/results.json`` as they finish; a rerun with ``--resume``
keeps the rows already there (with their timings) and times only the new ones, beside a freshly
timed baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

import dcache
from dcache.eval import policy_spec

# Tuned on the digits model, where at 50 steps they span ~2.3x to ~3x. taylorseer(interval=6)
# computes as many steps (11 of 50) as the diffusers TaylorSeerCache peer; the fbcache threshold
# matches the FirstBlockCache / DBCache peers. static(interval=25) computes 3 of 50 steps: the
# ablation that shows the task score can move.
DEFAULT_POLICIES = (
    "static(interval=3),teacache(threshold=0.6),fbcache(threshold=0.2),"
    "taylorseer(interval=5),taylorseer(interval=6),static(interval=25)"
)
EMBEDDED = ("scenes", "digits")


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
    # (images, seeds) -> extra row fields, e.g. {"adherence": 0.93}; the scenes model's task score.
    score: Callable[[torch.Tensor, list[int]], dict[str, float]] | None = None


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


def scene_prompts(seeds: list[int]) -> list[str]:
    """The prompt each seed draws in the scenes bench (``pipelines.zoo.scenes.seed_prompts``)."""
    from dcache.pipelines.zoo.scenes import seed_prompts

    return seed_prompts(seeds)


def attribute_rate(results: list[dict]) -> float:
    """Fraction of all single checks passed (background, count, relation, each object's colour,
    shape and size): a finer grade than whole-prompt adherence, which needs all of them at once."""
    checks: list[bool] = []
    for r in results:
        checks += [r["background"], r["count"]] + ([] if r["relation"] is None else [r["relation"]])
        checks += [o[k] for o in r["objects"] for k in ("colour", "shape", "size")]
    return sum(map(bool, checks)) / max(1, len(checks))


def scenes_target(guidance: float, device: str, weights_dir: str | None = None) -> Target:
    """The embedded scenes model; ``score`` is the checker's whole-prompt adherence."""
    from dcache.pipelines.zoo.scenes import check_adherence, load_scenes_pipeline

    pipe = load_scenes_pipeline(device=device, weights_dir=weights_dir)
    pipe.set_progress_bar_config(disable=True)

    def generate(seeds: list[int], steps: int) -> torch.Tensor:
        gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        out = pipe(scene_prompts(seeds), num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="pt")
        return _as_images(out)

    def score(images: torch.Tensor, seeds: list[int]) -> dict[str, float]:
        results = check_adherence(images, scene_prompts(seeds))
        return {"adherence": sum(r["whole"] for r in results) / len(results),
                "attributes": attribute_rate(results)}

    return Target(pipe, "embedded scenes (FluxTransformer2DModel, text-conditional)", generate, score=score)


def embedded_target(guidance: float, device: str, weights_dir: str | None = None) -> Target:
    """The embedded digits model (``--model digits``); scored by a digit classifier."""
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


# The embedded models by name: (guidance, device, weights_dir) -> Target.
TARGETS: dict[str, Callable[..., Target]] = {"scenes": scenes_target, "digits": embedded_target}


def make_target(model: str | None, guidance: float, device: str, weights_dir: str | None = None,
                prompt: str = "a photo of a cat") -> Target:
    """``None`` or "scenes": the scenes model; "digits": the digits model; else a diffusers pipeline."""
    name = model or "scenes"
    if name in TARGETS:
        return TARGETS[name](guidance, device, weights_dir)
    return model_target(model, guidance, device, prompt)


def _time(target: Target, seeds: list[int], steps: int, before: Callable[[], None]) -> tuple[torch.Tensor, float]:
    before()
    t0 = time.perf_counter()
    with torch.no_grad():
        images = target.generate(seeds, steps)
    return images, time.perf_counter() - t0


def _count(target: Target, seeds: list[int], steps: int, before: Callable[[], None]) -> tuple[torch.Tensor, float]:
    """(images, FLOPs) of one run under the FLOP counter (also the warm-up of the timed runs).

    FLOPs are counted at the dispatcher, so a module whose forward was replaced by any cache
    (dcache's, diffusers', cache-dit's) is counted only when its matmuls really run.
    """
    from torch.utils.flop_counter import FlopCounterMode

    before()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        images = target.generate(seeds, steps)
    return images, float(counter.get_total_flops())


def _slug(source: str, policy: str, options: dict) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{source}-{policy}-{json.dumps(options, sort_keys=True)}")[:120]


def _task_fields(target: Target, images: torch.Tensor, seeds: list[int]) -> dict:
    fields: dict[str, Any] = {}
    if target.classify is not None:
        fields["class_accuracy"] = _accuracy(target, images, seeds)
    if target.score is not None:
        fields.update(target.score(images, seeds))
    return fields


def _set_timings(row: dict, times: list[float]) -> None:
    row["wall_s"] = statistics.median(times)
    row["wall_min"], row["wall_max"], row["timing_runs"] = min(times), max(times), len(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dcache bench", description="Benchmark caching policies against the uncached baseline.")
    ap.add_argument("--task", default="image", help="image (this benchmark), dllm or ar-video (see their --help)")
    ap.add_argument("--model", default=None,
                    help="'scenes' (default: the embedded text-to-scene model), 'digits' (the embedded digits "
                         "model), or a hub id / local directory of a diffusers pipeline")
    ap.add_argument("--weights-dir", default=None,
                    help="embedded models: a training --out folder instead of the shipped weights")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help="comma list, options in parentheses")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--num-samples", type=int, default=None,
                    help="samples per configuration (seeds 0..N-1); default 32 for scenes, 10 otherwise")
    ap.add_argument("--seeds", default=None, help="explicit comma list of seeds (overrides --num-samples)")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--prompt", default="a photo of a cat", help="prompt for text-to-image models")
    ap.add_argument("--peers", action="store_true", help="also run diffusers' hooks and cache-dit")
    ap.add_argument("--out", default="dcache-bench", help="output directory")
    ap.add_argument("--resume", action="store_true", help="skip rows already in OUT/results.json")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved timing rounds (each times every configuration once; the median counts)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.steps < 2:
        ap.error("--steps must be at least 2")
    if args.weights_dir is not None and args.model not in (None, *EMBEDDED):
        ap.error(f"--weights-dir applies to the embedded models {EMBEDDED} only")
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            ap.error(f"--seeds must be a comma list of integers, got {args.seeds!r}")
    else:
        n = args.num_samples if args.num_samples is not None else (32 if args.model in (None, "scenes") else 10)
        if n < 1:
            ap.error("--num-samples must be at least 1")
        seeds = list(range(n))
    try:
        policies = parse_policies(args.policies)
    except ValueError as e:
        ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)

    from tqdm.auto import tqdm

    from dcache.eval import metrics, report

    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    target = make_target(args.model, args.guidance, args.device, args.weights_dir, args.prompt)
    meta = {"model": args.model or "scenes", "steps": args.steps, "seeds": seeds, "guidance": args.guidance,
            "torch_threads": torch.get_num_threads(), "device": args.device, "timing_rounds": args.repeats}
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
    no_setup = lambda: ((lambda p: None), (lambda p: None))  # noqa: E731 - the baseline installs nothing
    jobs: list[tuple[str, str, dict, Callable[[], tuple[Callable, Callable]]]] = [("baseline", "baseline", {}, no_setup)]
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
    grid_rows: list[tuple[str, torch.Tensor]] = []
    to_time: list[tuple[dict, Callable]] = []  # rows run in this invocation, with their setup
    base: torch.Tensor | None = None
    ran_new = False  # anything run in this invocation (a fully resumed run re-times nothing)
    bar = tqdm(total=len(jobs) + args.repeats, desc="dcache bench", unit="run")
    timed = False

    def timing_rounds() -> None:
        """Interleaved rounds over the baseline and the dcache rows run in this invocation. They run
        before any peer is installed, since a peer's teardown may leave patches behind."""
        nonlocal timed
        timed = True
        if not to_time:
            return
        # The baseline is timed in every round, even when resumed, so new rows compare with a baseline
        # measured under the same load.
        if rows[0] not in [r for r, _ in to_time]:
            to_time.insert(0, (rows[0], no_setup))
        times: dict[str, list[float]] = {r["id"]: [] for r, _ in to_time}
        for _ in range(args.repeats):
            for row, setup in to_time:
                before, teardown = setup()
                try:
                    times[row["id"]].append(_time(target, seeds, args.steps, lambda: before(target.pipe))[1])
                finally:
                    teardown(target.pipe)
            bar.update(1)
        for row, _ in to_time:
            _set_timings(row, times[row["id"]])

    for source, name, opts, setup in jobs:
        if source not in ("baseline", "dcache") and not timed:
            timing_rounds()
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
            peer_times: list[float] = []
            try:
                images, flops = _count(target, seeds, args.steps, lambda: before(target.pipe))
                if source not in ("baseline", "dcache"):
                    # Other projects' caches are timed while installed once: cache-dit's teardown does
                    # not undo all of its patching, so installing peers again in every round is unsafe.
                    peer_times = [_time(target, seeds, args.steps, lambda: before(target.pipe))[1]
                                  for _ in range(args.repeats)]
            finally:
                teardown(target.pipe)
            torch.save(images, img_file)
            row = {"id": rid, "source": source, "policy": name, "label": report.label(name, opts), "options": opts,
                   "flops": flops}
            ran_new = True
            if peer_times:
                _set_timings(row, peer_times)
            else:
                to_time.append((row, setup))
        if base is None:
            base = images
        if source == "baseline":
            row.update(psnr=float("inf"), ssim=1.0, lpips=0.0 if lp_ok else None, computed_fraction=1.0)
        else:
            row.update(psnr=metrics.psnr(images, base), ssim=metrics.ssim(images, base),
                       lpips=metrics.lpips_distance(images, base), computed_fraction=row["flops"] / rows[0]["flops"])
        row.update(_task_fields(target, images, seeds))
        rows.append(row)
        grid_rows.append((row["label"] if source in ("dcache", "baseline") else f"{source}:{name}", images))
        report.write_json(results_path, rows, dict(meta, notes=notes))
        bar.update(1)

    if not timed:
        timing_rounds()
    if ran_new:
        for r in rows:
            r["speedup"] = rows[0]["wall_s"] / r["wall_s"]
        report.write_json(results_path, rows, dict(meta, notes=notes))
    bar.close()

    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report.markdown(rows) + "\n")
    report.grid(os.path.join(args.out, "grid.png"), grid_rows)
    report.pareto(os.path.join(args.out, "pareto.png"), rows)
    print(f"\n{target.name}, {args.steps} steps, {len(seeds)} samples, guidance {args.guidance}, "
          f"{torch.get_num_threads()} CPU threads, wall_s = median of {args.repeats} interleaved rounds")
    print(report.table(rows))
    for n in notes:
        print(f"note: {n}")
    print(f"\nwrote {results_path}, results.md, grid.png, pareto.png in {args.out}")
    return 0


def _dcache_setup(pipe: Any, name: str, opts: dict) -> tuple[Callable, Callable]:
    # "a+b": policies composed on one model, options per part (eval.policy_spec).
    dcache.accelerate(pipe, name.split("+") if "+" in name else name, **opts)
    return (lambda p: None), dcache.disable


def _accuracy(target: Target, images: torch.Tensor, seeds: list[int]) -> float:
    pred = target.classify(images)
    labels = torch.tensor(target.labels(seeds))
    return float((pred == labels).float().mean())


if __name__ == "__main__":
    raise SystemExit(main())
