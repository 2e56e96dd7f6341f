"""The bench tools (frontier, robustness, stochastic sampling) refuse bad input with one clear
line and a non-zero exit, before any model is loaded."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("script, args, message", [
    ("bench/robustness.py", ["--policy", "nope"], "unknown policy"),
    ("bench/robustness.py", ["--rounds", "0"], "--rounds must be at least 1"),
    ("bench/robustness.py", ["--policy", "static(level=sideways)"], "level must be one of"),
    ("bench/frontier_explore.py", ["--out", os.devnull, "--configs", "static(budget=1)"], "budget must be in"),
    ("bench/stochastic_sampling.py", ["--out", os.devnull, "--policies", "nope"], "unknown policy"),
    ("bench/stochastic_sampling.py", ["--out", os.devnull, "--num-samples", "0"], "must be at least 1"),
])
def test_bad_input_is_one_clear_line(script, args, message):
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
