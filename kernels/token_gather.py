"""Token gather and scatter for token-subset caching (ToCa): pick rows of a (B, N, D) tensor.

``gather(x, idx)`` -> (B, k, D): the tokens ``idx[b]`` of every batch row ``b``.
``scatter(base, idx, src)`` -> (B, N, D): a new tensor equal to ``base`` with the tokens
``idx[b]`` of row ``b`` replaced by ``src[b]``. ``base`` is not modified (it is the cache, and
the block that receives the result may keep it).

Both are memory-bound. The Triton scatter is one pass: every output row reads either its
``base`` row or its ``src`` row (through an inverse position map), so the cached tensor is read
once and written once instead of a clone followed by an indexed write.
"""

from __future__ import annotations

import functools

import torch

from dcache.kernels._dispatch import use_triton


def _check(x: torch.Tensor, idx: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"token tensors must be (batch, tokens, dim), got shape {tuple(x.shape)}")
    if idx.dim() != 2 or idx.shape[0] != x.shape[0] or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be an integer (batch, k) tensor with batch {x.shape[0]}, "
                         f"got {idx.dtype} {tuple(idx.shape)}")


# ---------------------------------------------------------------------------------------------
# torch reference (the truth)
# ---------------------------------------------------------------------------------------------
def gather_torch(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_torch(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    out = base.clone()
    out.scatter_(1, idx.long().unsqueeze(-1).expand(-1, -1, base.shape[-1]), src.to(base.dtype))
    return out


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@functools.cache  # built on first use: importing triton must follow TRITON_INTERPRET
def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_kernel(X, IDX, OUT, N, K, D, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)  # over B * K output rows
        b = row // K
        tok = tl.load(IDX + row).to(tl.int64)
        src_row = b.to(tl.int64) * N + tok
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            mask = offs < D
            v = tl.load(X + src_row * D + offs, mask=mask)
            tl.store(OUT + row.to(tl.int64) * D + offs, v, mask=mask)

    @triton.jit
    def _merge_kernel(BASE, SRC, POS, OUT, N, K, D, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)  # over B * N output rows
        b = row // N
        p = tl.load(POS + row).to(tl.int64)  # position in src, or -1: keep the cached row
        take = p >= 0
        src_row = b.to(tl.int64) * K + tl.maximum(p, 0)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            mask = offs < D
            cached = tl.load(BASE + row.to(tl.int64) * D + offs, mask=mask & (p < 0))
            fresh = tl.load(SRC + src_row * D + offs, mask=mask & take)
            tl.store(OUT + row.to(tl.int64) * D + offs, tl.where(take, fresh, cached), mask=mask)

    return (_gather_kernel, _merge_kernel)


_BLOCK_D = 256


def gather_triton(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    gk, _ = _build()
    x = x.contiguous()
    idx = idx.contiguous()
    b, n, d = x.shape
    k = idx.shape[1]
    out = torch.empty((b, k, d), dtype=x.dtype, device=x.device)
    if b * k:
        gk[(b * k,)](x, idx, out, n, k, d, BLOCK_D=_BLOCK_D)
    return out


def scatter_triton(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    _, mk = _build()
    base = base.contiguous()
    src = src.to(base.dtype).contiguous()
    b, n, d = base.shape
    k = idx.shape[1]
    # Inverse map: pos[b, t] = j where idx[b, j] == t, else -1 (a small int tensor, B x N).
    pos = torch.full((b, n), -1, dtype=torch.int32, device=base.device)
    pos.scatter_(1, idx.long(), torch.arange(k, dtype=torch.int32, device=base.device).expand(b, k).contiguous())
    out = torch.empty_like(base)
    if b * n:
        mk[(b * n,)](base, src, pos, out, n, k, d, BLOCK_D=_BLOCK_D)
    return out


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Tokens ``idx[b]`` of each row of ``x`` (B, N, D) -> (B, k, D)."""
    _check(x, idx)
    if use_triton(x, idx):
        return gather_triton(x, idx)
    return gather_torch(x, idx)


def scatter(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A copy of ``base`` (B, N, D) with tokens ``idx[b]`` of row ``b`` replaced by ``src[b]`` (B, k, D).

    Indices within a row must be distinct (top-k selections are).
    """
    _check(base, idx)
    if src.shape != (base.shape[0], idx.shape[1], base.shape[2]):
        raise ValueError(f"src must be {(base.shape[0], idx.shape[1], base.shape[2])}, got {tuple(src.shape)}")
    if use_triton(base, idx, src):
        return scatter_triton(base, idx, src)
    return scatter_torch(base, idx, src)
