"""The ``dcache`` command line: ``dcache bench [--task image|dllm|ar-video] ...``."""

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="dcache", description="Caching for diffusion models.")
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="benchmark policies against the uncached baseline", add_help=False)
    bench.add_argument("--task", default="image", choices=sorted(BENCH_TASKS))
    sub.add_parser("policies", help="list the available policies")
    sub.add_parser("demo", help="Gradio demo: baseline vs accelerated (--host, --port)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "policies":
        from dcache.registry import policies

        for name, desc in policies().items():
            print(f"{name:20s} {desc}")
        return 0
    if args.command == "demo":
        from dcache.demos.app import main as demo_main

        return int(demo_main(rest) or 0)
    if args.command == "bench":
        try:
            mod = importlib.import_module(BENCH_TASKS[args.task])
        except ModuleNotFoundError as e:
            if e.name == BENCH_TASKS[args.task]:
                print(f"dcache bench --task {args.task} is not available yet in this version.", file=sys.stderr)
                return 2
            raise
        return int(mod.main(rest) or 0)
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
