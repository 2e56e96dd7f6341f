"""The ``dcache`` command line: ``dcache bench|eval|demo|policies ...`` and ``dcache --version``.

Each subcommand owns its own argument parser; this module routes to it, runs the checks every
command shares before any model is loaded (:mod:`dcache.eval.cli_errors`), and turns bad input,
Ctrl-C and failures into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Each task's benchmark owns its own argument parser; the CLI only routes to it.
BENCH_TASKS = {
    "image": "dcache.eval.bench_image",
    "dllm": "dcache.eval.bench_dllm",
    "ar-video": "dcache.eval.bench_ar_video",
}
# Other subcommands: name -> (module with main(argv), one-line help).
COMMANDS = {
    "eval": ("dcache.eval.evaluate", "evaluate policies: baseline vs accelerated samples, metrics, sweeps, resume"),
    "demo": ("dcache.demos.app", "Gradio demo: baseline vs accelerated side by side (--host, --port)"),
}

USAGE = """dcache <command> [options]    (dcache <command> --help for each)

commands:
  bench      benchmark policies against the uncached baseline (--task image|dllm|ar-video)
  eval       evaluate policies: samples, fidelity/FID/CLIP/task metrics, sweeps, Pareto, resume
  policies   list the policies (--task image|dllm|ar-video)
  demo       Gradio demo: baseline vs accelerated side by side (--host, --port)

examples:
  dcache eval --policy taylorseer --out runs/ts
  dcache bench --policies "taylorseer(interval=6),fbcache(threshold=0.1)"
  dcache policies --task ar-video
"""


def _version() -> str:
    import dcache

    return f"dcache {dcache.__version__}"


def main(argv: list[str] | None = None) -> int:
    from dcache.eval.cli_errors import guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "dcache" + (f" {argv[0]}" if argv and not argv[0].startswith("-") else "")
    out_hint = {"value": None}
    return guarded(prog, lambda: _route(argv, out_hint), lambda: out_hint["value"])


def _route(argv: list[str], out_hint: dict) -> int:
    from dcache.eval.cli_errors import ArgParser, UsageError

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(_version())
        return 0
    cmd, rest = argv[0], argv[1:]
    out_hint["value"] = _peek(rest, "--out") or ("dcache-eval" if cmd == "eval" else None)
    if cmd == "policies":
        ap = ArgParser(prog="dcache policies", description="List the policies, optionally of one task.")
        ap.add_argument("--task", default=None, choices=sorted(BENCH_TASKS), help="only this task's policies")
        args = ap.parse_args(rest)
        from dcache.registry import policies

        for name, info in policies(args.task, detailed=True).items():
            tag = info["granularity"] if args.task else f"{info['task']}, {info['granularity']}"
            print(f"{name:14s} [{tag}] {info['description']}")
        return 0
    if cmd == "bench":
        pre = ArgParser(prog="dcache bench", add_help=False)
        pre.add_argument("--task", default="image")
        args, rest2 = pre.parse_known_args(rest)
        if args.task not in BENCH_TASKS:
            raise UsageError(f"--task {args.task!r}; accepted: {', '.join(sorted(BENCH_TASKS))}")
        if "-h" not in rest2 and "--help" not in rest2:
            check_bench_args(args.task, rest2)
        mod = _import(BENCH_TASKS[args.task], f"dcache bench --task {args.task}")
        return int(mod.main(rest2) or 0)
    if cmd in COMMANDS:
        mod = _import(COMMANDS[cmd][0], f"dcache {cmd}")
        return int(mod.main(rest) or 0)
    raise UsageError(f"unknown command {cmd!r}; accepted: bench, eval, demo, policies (dcache --help)")


def _import(name: str, what: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            from dcache.eval.cli_errors import UsageError

            raise UsageError(f"{what} is not available in this version") from None
        raise


def _peek(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_bench_args(task: str, argv: list[str]) -> None:
    """The checks every bench shares, before its own parser loads anything.

    Only options each task's bench really has are looked at; the bench's own parser still
    rejects what it does not know.
    """
    from dcache.eval.cli_errors import (check_device, check_existing_dir, check_model, check_number,
                                        check_out_dir, check_policy_list)

    ap = argparse.ArgumentParser(add_help=False)
    for flag in ("--out", "--device", "--model", "--weights-dir", "--policies", "--steps", "--threads",
                 "--guidance", "--num-samples", "--repeats"):
        ap.add_argument(flag, default=None)
    known, _ = ap.parse_known_args(argv)
    for flag in ("steps", "threads", "num_samples", "repeats", "guidance"):
        raw = getattr(known, flag)
        if raw is None:
            continue
        name = "--" + flag.replace("_", "-")
        try:
            value = float(raw) if flag == "guidance" else int(raw)
        except ValueError:
            from dcache.eval.cli_errors import UsageError

            raise UsageError(f"{name} must be a number, got {raw!r}") from None
        check_number(name, value, {"steps": 1, "threads": 1, "num_samples": 1, "repeats": 1, "guidance": 0}[flag],
                     integer=flag != "guidance")
    if known.out is not None:
        check_out_dir(known.out)
    if known.device is not None:
        check_device(known.device)
    if task == "image":
        from dcache.eval.bench_image import EMBEDDED

        check_model(known.model, tuple(EMBEDDED))
        check_existing_dir(known.weights_dir, "--weights-dir")
        if known.policies is not None:
            check_policy_list(known.policies, "image")
    elif task == "ar-video":
        check_model(None if known.model in ("reference", "self-forcing-random") else known.model,
                    ("reference", "self-forcing-random"))
        if known.policies is not None:
            check_policy_list(known.policies, "ar-video")
    elif task == "dllm":
        check_existing_dir(known.model, "--model")


if __name__ == "__main__":
    raise SystemExit(main())
