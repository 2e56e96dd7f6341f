"""``dcache eval``: baseline and accelerated samples on identical seeds, scored with real metrics.

Every sample is written as it finishes (``OUT/samples/<config>/<index>_seed<seed>.png``) with a
line in the manifest; rerunning the same command continues where a killed run stopped, and a
different configuration in an existing ``--out`` is refused. Samples are generated one at a time,
interleaved across configurations (baseline, A, B, baseline, A, B, ...), so machine noise hits
every row alike; a speedup only ever compares samples timed in the same invocation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dcache.eval.cli_errors import (ArgParser, UsageError, check_device, check_existing_dir, check_model,
                                    check_number, check_out_dir, check_policy_list)

EXAMPLES = """examples:
  dcache eval --out runs/ts                                   # embedded model, taylorseer vs baseline
  dcache eval --policy "teacache(threshold=0.6),fbcache" --num-samples 20 --out runs/two
  dcache eval --policy taylorseer --option interval=4 --option order=2 --out runs/ts4
  dcache eval --sweep teacache.threshold=0.2,0.4,0.8 --sweep taylorseer.interval=3,5,7 --out runs/sweep
  dcache eval --peers --policy fbcache --out runs/peers       # + diffusers hooks and cache-dit rows
  dcache eval --fid --inception-weights weights-inception-2015-12-05-6726825d.pth --out runs/fid
  dcache eval --model ./my-pipeline --prompts prompts.txt --clip-model openai/clip-vit-base-patch32 --out runs/m
  dcache eval --model ./wan2.1-t2v --prompt "a cat runs" --num-frames 33 --steps 30 --peers --out runs/wan
  dcache policies --task image                                # the policy names and what they do

Kill it at any time (Ctrl-C): the same command with the same --out resumes; finished samples are
kept. Output: OUT/results.json, results.csv, results.md, pareto.png, grid.png, samples/."""

DEFAULT_POLICY = {"image": "taylorseer", "ar-video": "kv-rolling,forcing-kv",
                  "dllm": "dkv(variant=decode,refresh_interval=8),dual-cache(threshold=0.9)"}
TASKS = ("image", "ar-video", "dllm")
PARETO_METRICS = ("psnr", "ssim", "lpips", "task", "attributes", "token_agreement", "fid", "kid", "clip_score",
                  "image_reward")


@dataclass
class EvalConfig:
    """What one ``dcache eval`` run generates and measures; validates itself."""

    out: str
    task: str = "image"
    model: str | None = None
    weights_dir: str | None = None
    policy: str | None = None  # default: DEFAULT_POLICY[task]
    options: list[str] = field(default_factory=list)
    sweep: list[str] = field(default_factory=list)
    peers: bool = False
    steps: int | None = None  # default 50 (images); the AR-video sampler has its own fixed steps
    num_frames: int | None = None  # ar-video: 24; a diffusers video pipeline: its own default
    height: int | None = None  # diffusers pipelines: default the pipeline's own
    width: int | None = None
    gen_length: int = 64
    block_length: int = 32
    guidance: float | None = None
    num_samples: int = 8
    seeds: str | None = None
    prompts: str | None = None
    prompt: list[str] = field(default_factory=list)  # --prompt TEXT, repeatable
    classes: str | None = None
    device: str = "cpu"
    threads: int | None = None
    fid: bool = False
    inception_weights: str | None = None
    fid_extractor: str | None = None
    clip_model: str | None = None
    image_reward: str | None = None  # an ImageReward model name or checkpoint (dcache.eval.image_reward)
    vbench: str | None = None  # comma list of VBench dimensions
    vbench_python: str | None = None
    pareto_metric: str = "psnr"
    # derived by validate()
    vbench_dims: list[str] = field(default_factory=list, init=False)
    policies: list[tuple[str, dict]] = field(default_factory=list, init=False)
    pipeline: Any = field(default=None, init=False)  # video_pipelines.PipelineInfo of a diffusers --model
    seed_list: list[int] = field(default_factory=list, init=False)
    conditions: list[Any] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from dcache.eval.sweep import expand
        from dcache.eval.targets import BUILTIN_IMAGE_MODELS, BUILTIN_VIDEO_MODELS

        if self.task not in TASKS:
            raise UsageError(f"--task {self.task!r}; accepted: {', '.join(TASKS)}")
        video = self.task == "ar-video"
        if self.task != "image":
            for flag, value in (("--height", self.height), ("--width", self.width), ("--prompt", self.prompt or None)):
                if value is not None:
                    raise UsageError(f"{flag} does not apply to --task {self.task} (the model's own size and prompts)")
        if self.task == "dllm":
            for flag, value in (("--steps", self.steps), ("--guidance", self.guidance), ("--weights-dir", self.weights_dir),
                                ("--classes", self.classes), ("--prompts", self.prompts), ("--clip-model", self.clip_model),
                                ("--vbench", self.vbench), ("--num-frames", self.num_frames),
                                ("--image-reward", self.image_reward)):
                if value is not None:
                    raise UsageError(f"{flag} does not apply to --task dllm (one token per step on the model's own task)")
            for flag, on in (("--peers", self.peers), ("--fid", self.fid)):
                if on:
                    raise UsageError(f"{flag} does not apply to --task dllm")
            check_number("--gen-length", self.gen_length, 1, integer=True)
            check_number("--block-length", self.block_length, 1, integer=True)
            if self.gen_length % self.block_length:
                raise UsageError(f"--gen-length {self.gen_length} must be a multiple of --block-length {self.block_length}")
            check_existing_dir(self.model, "--model")
            if self.pareto_metric == "psnr":
                self.pareto_metric = "task"
        elif video:
            for flag, value in (("--steps", self.steps), ("--guidance", self.guidance), ("--weights-dir", self.weights_dir),
                                ("--classes", self.classes), ("--prompts", self.prompts), ("--clip-model", self.clip_model)):
                if value is not None:
                    raise UsageError(f"{flag} does not apply to --task ar-video (its sampler and prompts are the model's)")
            for flag, on in (("--peers", self.peers), ("--fid", self.fid)):
                if on:
                    raise UsageError(f"{flag} is not available for --task ar-video yet (fidelity is per frame)")
            if self.num_frames is None:
                self.num_frames = 24
            check_number("--num-frames", self.num_frames, 1, integer=True)
        elif self.steps is None:
            self.steps = 50
        if self.policy is None:
            self.policy = DEFAULT_POLICY[self.task]
        check_out_dir(self.out)
        check_number("--steps", self.steps, 1, integer=True)
        check_number("--guidance", self.guidance, 0)
        check_number("--num-samples", self.num_samples, 1, integer=True)
        check_number("--threads", self.threads, 1, integer=True)
        check_device(self.device)
        if self.task != "dllm":
            check_model(self.model, BUILTIN_VIDEO_MODELS if video else BUILTIN_IMAGE_MODELS)
        if self.task == "image":
            self._check_pipeline()
        if self.vbench_python and not self.vbench:
            raise UsageError("--vbench-python needs --vbench DIMENSIONS (e.g. --vbench subject_consistency,motion_smoothness)")
        if self.vbench:
            from dcache.eval import vbench

            if not (video or (self.pipeline and self.pipeline.video)):
                raise UsageError("--vbench scores videos: use it with --task ar-video or a diffusers video pipeline --model")
            self.vbench_dims = vbench.check_dimensions(self.vbench)
            self.vbench_python = vbench.check_python(self.vbench_python)
        check_existing_dir(self.weights_dir, "--weights-dir")
        if self.weights_dir and self.model not in (None, "digits", "scenes"):
            raise UsageError("--weights-dir applies to the built-in models (digits, scenes), not --model " + repr(self.model))
        policies = check_policy_list(self.policy, self.task, "--policy", extra_names=("kv-full",) if video else ())
        if video:
            policies = [(n, o) for n, o in policies if n != "kv-full"]  # kv-full is the baseline row
        if self.options:
            if len(policies) != 1:
                raise UsageError("--option applies to a single --policy; with a list write name(key=value,...)")
            opts = dict(policies[0][1])
            for item in self.options:
                if "=" not in item:
                    raise UsageError(f"--option {item!r}: write key=value (e.g. --option interval=4)")
                k, v = (s.strip() for s in item.split("=", 1))
                opts[k.replace("-", "_")] = v
            spec = policies[0][0] + "(" + ",".join(f"{k}={v}" for k, v in opts.items()) + ")"
            policies = check_policy_list(spec, self.task, "--option")
        try:
            self.policies = expand(policies, self.sweep, task=self.task)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.seed_list = _seeds(self.seeds, self.num_samples)
        if self.prompts and self.classes:
            raise UsageError("give --prompts or --classes, not both")
        if self.prompt and (self.prompts or self.classes):
            raise UsageError("give --prompt TEXT or --prompts FILE / --classes, not both")
        if self.prompts:
            self.conditions = _read_prompts(self.prompts)
        elif self.prompt:
            if any(not p.strip() for p in self.prompt):
                raise UsageError("--prompt must not be empty")
            self.conditions = [p.strip() for p in self.prompt]
        elif self.classes:
            try:
                self.conditions = [int(c) for c in self.classes.split(",") if c.strip()]
            except ValueError:
                raise UsageError(f"--classes must be a comma list of integers, got {self.classes!r}") from None
            if not self.conditions or min(self.conditions) < 0:
                raise UsageError(f"--classes must be non-negative integers, got {self.classes!r}")
        if self.inception_weights and not os.path.isfile(self.inception_weights):
            raise UsageError(f"--inception-weights {self.inception_weights!r} is not a file")
        if self.fid_extractor and not os.path.isfile(self.fid_extractor):
            raise UsageError(f"--fid-extractor {self.fid_extractor!r} is not a file (a TorchScript module)")
        if self.pareto_metric not in PARETO_METRICS:
            raise UsageError(f"--pareto-metric {self.pareto_metric!r}; accepted: {', '.join(PARETO_METRICS)}")
        if self.pareto_metric in ("fid", "kid") and not self.fid:
            raise UsageError(f"--pareto-metric {self.pareto_metric} needs --fid")
        if self.pareto_metric == "clip_score" and not self.clip_model:
            raise UsageError("--pareto-metric clip_score needs --clip-model")
        if self.pareto_metric == "image_reward" and not self.image_reward:
            raise UsageError("--pareto-metric image_reward needs --image-reward")

    def _check_pipeline(self) -> None:
        """A diffusers ``--model``: a pipeline with a denoiser; video options only for video pipelines;
        prompts (and a text encoder to read them) for prompt-conditioned ones. Reads only model_index.json."""
        from dcache.eval.targets import BUILTIN_IMAGE_MODELS
        from dcache.eval.video_pipelines import inspect_model

        for flag, v in (("--num-frames", self.num_frames), ("--height", self.height), ("--width", self.width)):
            check_number(flag, v, 1, integer=True)
        if self.model in (None, *BUILTIN_IMAGE_MODELS):
            for flag, v in (("--num-frames", self.num_frames), ("--height", self.height), ("--width", self.width)):
                if v is not None:
                    raise UsageError(f"{flag} applies to a diffusers pipeline --model, not the embedded "
                                     f"{self.model or 'default'} model (use --task ar-video for the AR video model)")
            return
        info = self.pipeline = inspect_model(self.model)
        if info is None:  # a hub id not cached yet: the loader checks the same things
            return
        if self.num_frames is not None and not info.video:
            raise UsageError(f"--num-frames applies to video pipelines; --model {self.model!r} is a {info.class_name} (images)")
        if info.takes_prompt:
            if not info.has_text_encoder:
                raise UsageError(f"--model {self.model!r} ({info.class_name}) has no text_encoder/tokenizer, so prompts "
                                 "cannot be encoded; save the pipeline with them")
            if not (self.prompt or self.prompts):
                raise UsageError(f"--model {self.model!r} ({info.class_name}) takes prompts: pass --prompt TEXT "
                                 "(repeatable) or --prompts FILE")


def _seeds(spec: str | None, n: int) -> list[int]:
    if not spec:
        return list(range(n))
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out += list(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UsageError(f"--seeds must be integers or ranges like 0-9, comma-separated; got {spec!r}") from None
    if not out:
        raise UsageError(f"--seeds {spec!r} names no seeds")
    if len(set(out)) != len(out):
        raise UsageError(f"--seeds {spec!r} repeats a seed")
    if min(out) < 0:
        raise UsageError(f"--seeds must be non-negative, got {spec!r}")
    return out


def _read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UsageError(f"--prompts {path!r} is not a file (one prompt a line, or a JSON list)")
    text = open(path, encoding="utf-8").read()
    if path.endswith(".json"):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--prompts {path!r} is not valid JSON: {e}") from None
        if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
            raise UsageError(f"--prompts {path!r} must hold a JSON list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {path!r} holds no prompts")
    return prompts


def build_parser() -> ArgParser:
    from dcache.eval.targets import DEFAULT_IMAGE_MODEL

    ap = ArgParser(prog="dcache eval", description="Baseline and accelerated samples on identical seeds, scored with real metrics.", epilog=EXAMPLES)
    ap.add_argument("--model", default=None,
                    help=f"digits | scenes (embedded), or a diffusers image or video pipeline: a directory or a cached "
                         f"hub id (default: {DEFAULT_IMAGE_MODEL})")
    ap.add_argument("--weights-dir", default=None, help="embedded model: a training --out folder instead of the shipped weights")
    ap.add_argument("--task", default="image", help="image, ar-video or dllm")
    ap.add_argument("--policy", "--policies", default=None, help="policy list, the shared syntax: name,name(key=value,...) "
                    "(default: taylorseer for images, kv-rolling,forcing-kv against kv-full for ar-video)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", dest="options",
                    help="an option of the single --policy (repeatable)")
    ap.add_argument("--sweep", action="append", default=[], metavar="POLICY.KEY=V1,V2",
                    help="run every value (repeatable; several on one policy form a grid)")
    ap.add_argument("--peers", action="store_true", help="also evaluate diffusers' cache hooks and cache-dit")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50; images only)")
    ap.add_argument("--num-frames", type=int, default=None,
                    help="frames per video (ar-video: default 24; a diffusers video pipeline: its own default)")
    ap.add_argument("--height", type=int, default=None, help="diffusers pipelines: image/video height (default: the pipeline's)")
    ap.add_argument("--width", type=int, default=None, help="diffusers pipelines: image/video width (default: the pipeline's)")
    ap.add_argument("--gen-length", type=int, default=64, help="dllm: tokens generated per problem")
    ap.add_argument("--block-length", type=int, default=32, help="dllm: semi-autoregressive block size")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    ap.add_argument("--num-samples", type=int, default=8, help="samples per configuration (seeds 0..N-1)")
    ap.add_argument("--seeds", default=None, help="explicit seeds, e.g. 0-9 or 3,7,11 (overrides --num-samples)")
    ap.add_argument("--prompts", default=None, help="text file, one prompt a line (or a .json list); cycled over samples")
    ap.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                    help="a prompt (repeatable; cycled over samples), instead of --prompts FILE")
    ap.add_argument("--classes", default=None, help="class labels for class-conditional models, e.g. 0,1,2; cycled")
    ap.add_argument("--out", default="dcache-eval", help="output directory (rerun with the same one to resume)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--fid", action="store_true", help="FID and KID of each row against the baseline samples")
    ap.add_argument("--inception-weights", default=None, metavar="PATH",
                    help="Inception .pth for FID/KID (default: torch-fidelity's file in the torch hub cache)")
    ap.add_argument("--fid-extractor", default=None, metavar="FILE",
                    help="a TorchScript feature extractor for FID/KID instead of Inception")
    ap.add_argument("--clip-model", default=None, help="CLIP score with this hub id or local directory")
    ap.add_argument("--image-reward", nargs="?", const="ImageReward-v1.0", default=None, metavar="MODEL",
                    help="ImageReward of each row (needs the image-reward package; MODEL: ImageReward-v1.0 or a .pt)")
    ap.add_argument("--vbench", default=None, metavar="DIMS",
                    help="videos (ar-video, diffusers video pipelines): VBench dimensions, e.g. subject_consistency,motion_smoothness")
    ap.add_argument("--vbench-python", default=None, metavar="PATH",
                    help="the python of a separate environment with VBench installed (it pins old transformers/numpy)")
    ap.add_argument("--pareto-metric", default="psnr", help=f"quality axis of pareto.png: {', '.join(PARETO_METRICS)}")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = EvalConfig(**vars(args))
    return run(cfg)


# -- the run ----------------------------------------------------------------------------------

@dataclass
class Job:
    id: str
    source: str
    policy: str
    options: dict
    label: str
    setup: Callable[[], tuple[Callable[[], None], Callable[[], None]]]  # -> (before each sample, teardown)


def _slug(text: str) -> str:
    import hashlib
    import re

    s = re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:60]
    return f"{s}-{hashlib.sha1(text.encode()).hexdigest()[:6]}" if s != text else s


def _jobs(cfg: EvalConfig, model: Any, metric_fns: dict) -> tuple[list[Job], list[str]]:
    import dcache
    from dcache.eval import report

    def dcache_setup(name: str, opts: dict):
        def setup():
            dcache.accelerate(model.pipe, name, **opts)
            return (lambda: None), (lambda: dcache.disable(model.pipe))
        return setup

    if cfg.task == "ar-video":  # the AR pipeline always runs with a KV policy; the full cache is exact
        jobs = [Job("baseline", "baseline", "kv-full", {}, "baseline (kv-full)", dcache_setup("kv-full", {}))]
    else:
        jobs = [Job("baseline", "baseline", "baseline", {}, "baseline", lambda: ((lambda: None), (lambda: None)))]
    for name, opts in cfg.policies:
        lab = report.label(name, opts)
        jobs.append(Job(_slug(lab), "dcache", name, opts, lab, dcache_setup(name, opts)))
    notes: list[str] = []
    if cfg.peers:
        from dcache.eval.peers import available_peers
        from dcache.eval.video_peers import video_peers

        def calibrate(pipe: Any, steps: int) -> None:
            model.draw(cfg.seed_list[0], metric_fns["conditions"][0], steps, cfg.guidance)

        find = video_peers if model.info.get("kind") == "video" else available_peers
        peers, notes = find(calibrate, model.separate_cfg)
        for p in peers:
            def setup(p=p):
                before, teardown = p.setup(model.pipe, cfg.steps)
                return (lambda: before(model.pipe)), (lambda: teardown(model.pipe))
            lab = report.label(p.name, p.options)
            jobs.append(Job(_slug(f"{p.source}-{lab}"), p.source, p.name, p.options, lab, setup))
    return jobs, notes


def _run_config(cfg: EvalConfig, jobs: list[Job], conditions: list[Any]) -> dict:
    """What must match for an existing --out to be resumed (outputs depend on all of it)."""
    from dcache.eval.targets import DEFAULT_IMAGE_MODEL

    model = cfg.model or (DEFAULT_IMAGE_MODEL if cfg.task == "image" else "reference")
    return {"task": cfg.task, "model": model, "weights_dir": cfg.weights_dir, "steps": cfg.steps,
            "num_frames": cfg.num_frames, "size": [cfg.height, cfg.width] if (cfg.height or cfg.width) else None,
            "gen_length": [cfg.gen_length, cfg.block_length] if cfg.task == "dllm" else None,
            "guidance": cfg.guidance, "seeds": cfg.seed_list, "conditions": conditions, "device": cfg.device,
            "configs": [{"id": j.id, "source": j.source, "policy": j.policy, "options": j.options} for j in jobs]}


def _dist_state(device: str):
    """accelerate's PartialState when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    import torch

    return PartialState(cpu=torch.device(device).type == "cpu")


def run(cfg: EvalConfig) -> int:
    import torch
    from tqdm.auto import tqdm

    from dcache.eval import distribution
    from dcache.eval.measure import count_pass
    from dcache.eval.samples import SampleStore
    from dcache.eval.targets import load_dllm_model, load_model, load_video_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Everything that can refuse does so before the first sample: a changed configuration in an
    # existing --out, metric weights, then the model (the full configuration is checked again below).
    from dcache.eval.samples import check_config

    partial = _run_config(cfg, [], None)
    check_config(cfg.out, {k: v for k, v in partial.items() if k not in ("configs", "conditions")})
    scorers = distribution.prepare(fid=cfg.fid, inception_weights=cfg.inception_weights,
                                   fid_extractor=cfg.fid_extractor, clip_model=cfg.clip_model,
                                   num_samples=len(cfg.seed_list))
    if cfg.image_reward:
        from dcache.eval import image_reward

        scorers.image_reward = image_reward.load(cfg.image_reward, cfg.device)
    if cfg.task == "ar-video":
        model = load_video_model(cfg.model, cfg.device, cfg.num_frames)
    elif cfg.task == "dllm":
        model = load_dllm_model(cfg.model, cfg.device, cfg.gen_length, cfg.block_length)
    else:
        model = load_model(cfg.model, cfg.device, cfg.weights_dir, num_frames=cfg.num_frames, height=cfg.height,
                           width=cfg.width)
    n = len(cfg.seed_list)
    if cfg.conditions is None and "seed_conditions" in model.info:  # scenes: seed s draws prompt s of its grammar
        base_conds = model.info["seed_conditions"](cfg.seed_list)
    else:
        base_conds = cfg.conditions if cfg.conditions is not None else model.default_conditions(n)
    if cfg.task == "dllm":
        base_conds = list(cfg.seed_list)  # the problem is drawn from the sample's seed
    if model.conditioning == "prompt" and cfg.classes:
        raise UsageError(f"--model {cfg.model or 'default'} takes prompts (--prompts FILE), not --classes")
    if model.conditioning == "class" and cfg.prompts:
        raise UsageError(f"--model {cfg.model or 'default'} is class-conditional: use --classes, not --prompts")
    if model.conditioning == "class" and cfg.classes and "num_classes" in model.info:
        bad = [c for c in base_conds if c >= model.info["num_classes"]]
        if bad:
            raise UsageError(f"--classes {bad[0]} is out of range; this model draws classes 0..{model.info['num_classes'] - 1}")
    conditions = [base_conds[i % len(base_conds)] for i in range(n)]
    if cfg.clip_model and model.conditioning != "prompt" and model.text is str:
        raise UsageError("--clip-model needs captions: this model takes no prompts")
    jobs, notes = _jobs(cfg, model, {"conditions": conditions})

    state = _dist_state(cfg.device)
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    run_cfg = _run_config(cfg, jobs, conditions)
    if rank == 0:
        store = SampleStore(cfg.out, run_cfg, rank)
    if state:
        state.wait_for_everyone()
    if rank != 0:
        store = SampleStore(cfg.out, run_cfg, rank, create=False)

    # Contiguous shares, earlier ranks one more (accelerate's split_between_processes convention).
    per, extra = divmod(n, world)
    lo = rank * per + min(rank, extra)
    mine = list(range(lo, lo + per + (1 if rank < extra else 0)))

    done = store.finished()
    measured = store.measured()
    todo = [(i, j) for i in mine for j in jobs if (j.id, i) not in done]
    bar = tqdm(total=len(mine) * len(jobs), initial=len(mine) * len(jobs) - len(todo), unit="sample",
               desc=f"dcache eval{f' [{rank}/{world}]' if world > 1 else ''}", disable=None, file=sys.stderr)

    def draw(i: int):
        return model.draw(cfg.seed_list[i], conditions[i], cfg.steps, cfg.guidance)

    skipped: dict[str, str] = {}
    cuda = torch.device(cfg.device).type == "cuda"

    def install(j: Job):
        try:
            return j.setup()
        except Exception as e:  # noqa: BLE001 - a peer that cannot run on this model is a note, not fatal
            skipped[j.id] = f"{j.source} {j.label} skipped: {type(e).__name__}: {str(e).splitlines()[0]}"
            return None

    def measure(j: Job, before: Callable[[], None]) -> None:
        # One untimed pass under the FLOP counter and memory probe; also the warm-up, so the first
        # timed sample is not charged for allocator and thread start-up.
        if rank == 0 and j.id not in measured:
            bar.set_postfix_str(f"measure {j.label}")
            before()
            flops, peak = count_pass(lambda: draw(mine[0] if mine else 0), cfg.device)
            measured[j.id] = store.add_measure(j.id, flops=flops, peak_mem_bytes=peak)

    def sample(j: Job, i: int, before: Callable[[], None]) -> None:
        bar.set_postfix_str(f"{j.label} #{i}")
        before()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            img = draw(i)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        extra = {"fps": model.info.get("fps", 8)} if img.ndim == 5 else {}
        store.add_sample(j.id, i, cfg.seed_list[i], img[0], wall_s=wall, threads=torch.get_num_threads(), **extra)
        bar.update(1)

    # dcache's rows are set up and torn down around every sample (cheap), so they interleave
    # with the baseline: baseline, A, B, baseline, A, B, ...
    inter = [j for j in jobs if j.source in ("baseline", "dcache")]
    block = [j for j in jobs if j not in inter]
    if todo:
        if rank != 0 and mine:
            draw(mine[0])  # warm-up; rank 0 warms up in its measuring passes
        for j in inter:
            if j.id not in measured and rank == 0:
                hooks = install(j)
                if hooks:
                    try:
                        measure(j, hooks[0])
                    finally:
                        hooks[1]()
    for i in mine:
        for j in inter:
            if (j.id, i) in done or j.id in skipped:
                continue
            hooks = install(j)
            if hooks:
                try:
                    sample(j, i, hooks[0])
                finally:
                    hooks[1]()
    # Peers are installed once each (setting one up can cost a calibration run, and re-installing
    # another toolkit's hooks over and over is not what users do); their samples run as a block.
    for j in block:
        if all((j.id, i) in done for i in mine) and (rank != 0 or j.id in measured):
            continue
        hooks = install(j)
        if not hooks:
            continue
        try:
            measure(j, hooks[0])
            for i in mine:
                if (j.id, i) not in done:
                    sample(j, i, hooks[0])
        finally:
            hooks[1]()
    bar.close()
    notes += list(skipped.values())
    if state:
        state.wait_for_everyone()
    if rank == 0:
        from dcache.eval.results import score, vbench_rows, write_outputs

        rows = score(cfg, store, jobs, conditions, model, scorers, notes)
        if cfg.vbench:
            vbench_rows(cfg, store, rows, model, conditions)
        write_outputs(cfg, rows, notes, store, jobs, model)
    if state:
        state.wait_for_everyone()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from dcache.eval.cli_errors import guarded

    raise SystemExit(guarded("dcache eval", lambda: main(sys.argv[1:])))
