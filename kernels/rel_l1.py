"""Relative L1 distance ``mean|a - b| / mean|b|``: the change indicator of TeaCache and FBCache.

One pass over both tensors; the Triton kernel reduces each block and adds the two partial sums
atomically, so a multi-GB residual is read exactly once.
"""

from __future__ import annotations

import torch

from dcache.kernels._dispatch import use_triton

_EPS = 1e-12


def rel_l1_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    num = (a.float() - b.float()).abs().sum()
    den = b.float().abs().sum()
    return num / den.clamp_min(_EPS)


_kernel = None


def _build():
    global _kernel
    if _kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def _rel_l1_kernel(A, B, ACC, n, BLOCK: tl.constexpr):
            pid = tl.program_id(0)
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
            tl.atomic_add(ACC, tl.sum(tl.abs(a - b), axis=0))
            tl.atomic_add(ACC + 1, tl.sum(tl.abs(b), axis=0))

        _kernel = _rel_l1_kernel
    return _kernel


def rel_l1_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import triton

    k = _build()
    a, b = a.contiguous(), b.contiguous()
    n = a.numel()
    acc = torch.zeros(2, dtype=torch.float32, device=a.device)
    block = 2048
    k[(triton.cdiv(n, block),)](a, b, acc, n, BLOCK=block)
    return acc[0] / acc[1].clamp_min(_EPS)


def rel_l1(a: torch.Tensor, b: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """Scalar tensor ``Σ|a - b| / Σ|b|`` (equal to the ratio of means).

    ``group``: a torch.distributed process group whose ranks each hold a shard of the tensors
    (context/sequence parallelism). The two sums are all-reduced before dividing, so every rank
    gets the same distance and takes the same skip decision.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if group is not None:
        import torch.distributed as dist

        sums = torch.stack([(a.float() - b.float()).abs().sum(), b.float().abs().sum()])
        dist.all_reduce(sums, group=group)
        return sums[0] / sums[1].clamp_min(_EPS)
    if use_triton(a, b):
        return rel_l1_triton(a, b)
    return rel_l1_torch(a, b)


def rel_l1_rows(a: torch.Tensor, b: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """Per batch row ``Σ|a - b| / Σ|b|`` over the other dimensions, shape ``(batch,)`` (float32).

    For per-sample decisions. ``group`` as in :func:`rel_l1`: both per-row sums are all-reduced
    over the context-parallel group before dividing. Plain torch (one pass per sum) everywhere.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    af, bf = a.float().reshape(a.shape[0], -1), b.float().reshape(b.shape[0], -1)
    sums = torch.stack([(af - bf).abs().sum(dim=1), bf.abs().sum(dim=1)])
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(sums, group=group)
    return sums[0] / sums[1].clamp_min(_EPS)
