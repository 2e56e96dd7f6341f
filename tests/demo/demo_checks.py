"""Independent readings of what the demo shows: timeline lines, pixels of a shown image, numbers."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import torch
from PIL import Image

LINE = re.compile(r"step (\d+) branch (\d+): computed (\d+), reused (\d+), forecast (\d+)")


def parse_timeline(text: str) -> dict[tuple[int, int], tuple[int, int, int]]:
    out = {}
    for line in text.strip().splitlines():
        m = LINE.fullmatch(line.strip())
        assert m, f"unexpected timeline line {line!r}"
        s, b, c, r, f = (int(g) for g in m.groups())
        out[(s, b)] = (c, r, f)
    return out


def expected_timeline(stats: dict) -> dict[tuple[int, int], tuple[int, int, int]]:
    out = {}
    for e in stats["timeline"]:
        n = Counter(e["sites"].values())
        out[(e["step"], e["branch"])] = (n["computed"], n["reused"], n["forecast"])
    return out


def shown_pixels(image: Image.Image, size: int) -> np.ndarray:
    """The model's own pixels (uint8, H x W, first channel) back from a whole-pixel upscaled image."""
    arr = np.asarray(image.convert("RGB"))
    step = arr.shape[0] // size
    assert arr.shape[0] == size * step and arr.shape[1] == size * step, arr.shape
    return arr[::step, ::step, 0]


def as_uint8(img: torch.Tensor) -> np.ndarray:
    return (img[0].clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)


def number_after(text: str, label: str) -> float:
    m = re.search(re.escape(label) + r"\s*([0-9.]+)", text)
    assert m, f"{label!r} not in {text!r}"
    return float(m.group(1))


def in_ci() -> bool:
    import os

    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str):
    """Import ``module``; without it skip here, but fail under CI (a CI run never skips the demo)."""
    import importlib

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if in_ci():
            raise RuntimeError(f"the demo tests need {module} under CI: {e}") from e
        pytest.skip(f"needs {module}", allow_module_level=True)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
