"""Choose the Triton kernel or the torch reference for an op.

Triton runs for CUDA tensors. ``DCACHE_FORCE_TRITON=1`` also routes CPU tensors to Triton, which
then needs ``TRITON_INTERPRET=1`` set before triton is imported (that is how CI checks kernels).
``DCACHE_DISABLE_TRITON=1`` forces the torch reference everywhere.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    if os.environ.get("DCACHE_DISABLE_TRITON") == "1" or not triton_available():
        return False
    if os.environ.get("DCACHE_FORCE_TRITON") == "1":
        return True
    return all(t.is_cuda for t in tensors)
