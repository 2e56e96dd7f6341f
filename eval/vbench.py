"""VBench through the user's own environment: naming layout, one driver run per row, results read back.

VBench pins ``transformers==4.33.2`` and ``numpy<2`` and needs CUDA (shared/reference/eval-tools.md
§0-1), so it never shares dcache's environment: ``--vbench-python PATH`` names the interpreter of
a separate one. Per configuration the videos are linked into VBench's custom-input layout,
``<prompt>-<index>.mp4`` (VBench reads the prompt from the file name, dropping ``-<digits>``),
VBench's Python API runs in that interpreter, and the dimension scores are read from its
``<name>_eval_results.json``. VBench's exit status is not trusted (its CLI ignores failures of
the process it starts): a run counts only when that file exists and holds every dimension asked for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

from dcache.eval.cli_errors import UsageError

__all__ = ["CUSTOM_DIMENSIONS", "SETUP", "check_python", "layout", "run", "read_results"]

# Dimensions VBench evaluates on custom videos without its own prompt suite's auxiliary info.
CUSTOM_DIMENSIONS = ("subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
                     "aesthetic_quality", "imaging_quality", "temporal_flickering", "temporal_style",
                     "overall_consistency")

SETUP = ("VBench needs its own environment (it pins transformers==4.33.2 and numpy<2, and needs CUDA): "
         "python -m venv vbench-env && vbench-env/bin/pip install torch --index-url "
         "https://download.pytorch.org/whl/cu121 && vbench-env/bin/pip install vbench 'setuptools<82'; "
         "then pass --vbench-python vbench-env/bin/python")

# Runs inside the user's VBench environment; only the standard library and VBench there.
_DRIVER = r'''
import json, os, sys
args = json.load(open(sys.argv[1]))
import torch
import vbench
from vbench import VBench
try:
    from vbench.distributed import dist_init
    dist_init()
except ImportError:
    pass
full_info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VBench(device, full_info, args["output_dir"]).evaluate(
    videos_path=args["videos_path"], name=args["name"], dimension_list=args["dimensions"], mode="custom_input")
'''


def check_dimensions(spec: str) -> list[str]:
    dims = [d.strip() for d in spec.split(",") if d.strip()]
    bad = [d for d in dims if d not in CUSTOM_DIMENSIONS]
    if not dims or bad:
        raise UsageError(f"--vbench {spec!r}: unknown dimension(s) {bad or '(none given)'}; "
                         f"accepted on custom videos: {', '.join(CUSTOM_DIMENSIONS)}")
    return dims


def check_python(python: str | None) -> str:
    """The VBench interpreter exists and imports vbench; else one line saying how to set it up."""
    if not python:
        raise UsageError(f"--vbench needs --vbench-python PATH. {SETUP}")
    path = shutil.which(python) or python
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise UsageError(f"--vbench-python {python!r} is not an executable. {SETUP}")
    try:
        p = subprocess.run([path, "-c", "import vbench"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"--vbench-python {python!r} does not run ({type(e).__name__}). {SETUP}") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        raise UsageError(f"--vbench-python {python!r} cannot import vbench ({last}). {SETUP}")
    return path


def _safe(prompt: str) -> str:
    # A file name cannot hold '/', and VBench strips a trailing "-<digits>" as the index.
    s = prompt.replace("/", " ").replace("\0", "").strip()
    return re.sub(r"-(\d+)$", r" \1", s) or "video"


def layout(videos: list[tuple[str, str]], dest: str) -> dict[str, str]:
    """Link ``(mp4 path, prompt)`` pairs into ``dest`` as ``<prompt>-<i>.mp4``; → {file name: prompt}.

    ``i`` counts the videos of one prompt (VBench's standard suite samples 5 per prompt, 0-4).
    """
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    seen: dict[str, int] = {}
    names = {}
    for src, prompt in videos:
        stem = _safe(prompt)
        i = seen.get(stem, 0)
        seen[stem] = i + 1
        name = f"{stem}-{i}.mp4"
        try:
            os.link(src, os.path.join(dest, name))
        except OSError:
            shutil.copyfile(src, os.path.join(dest, name))
        names[name] = prompt
    return names


def read_results(path: str, dimensions: list[str]) -> dict[str, Any]:
    """``{dim: [aggregate, [per-video dicts]]}`` → ``{dim: aggregate}``; missing dimensions are an error."""
    with open(path) as f:
        data = json.load(f)
    out = {}
    for d in dimensions:
        v = data.get(d)
        if not (isinstance(v, list) and v and isinstance(v[0], (int, float))):
            raise RuntimeError(f"VBench results {path} have no score for {d!r}")
        out[d] = float(v[0])
    return out


def run(python: str, videos_dir: str, dimensions: list[str], output_dir: str, name: str,
        timeout: float = 6 * 3600) -> dict[str, float]:
    """Run VBench on one folder; the scores come from its results file, whatever its exit status."""
    os.makedirs(output_dir, exist_ok=True)
    result_file = os.path.join(output_dir, f"{name}_eval_results.json")
    if os.path.exists(result_file):
        os.remove(result_file)  # never read a stale file from an earlier run as this run's
    args_file = os.path.join(output_dir, f"{name}_args.json")
    driver = os.path.join(output_dir, "dcache_vbench_driver.py")
    with open(driver, "w") as f:
        f.write(_DRIVER)
    with open(args_file, "w") as f:
        json.dump({"videos_path": os.path.abspath(videos_dir), "name": name, "dimensions": dimensions,
                   "output_dir": os.path.abspath(output_dir)}, f)
    env = dict(os.environ)
    env.setdefault("MASTER_ADDR", "localhost")
    env.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))  # concurrent runs must not share a port
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # dcache's environment must not leak into VBench's
        env.pop(k, None)
    log = os.path.join(output_dir, f"{name}.log")
    with open(log, "w") as f:
        p = subprocess.run([python, driver, args_file], stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if not os.path.exists(result_file):
        raise RuntimeError(f"VBench wrote no {os.path.basename(result_file)} (exit status {p.returncode}); see {log}")
    return read_results(result_file, dimensions)


if __name__ == "__main__":  # pragma: no cover - `python -m dcache.eval.vbench` prints the setup line
    print(SETUP, file=sys.stderr)
