"""Head-grouped gather/scatter for Forcing-KV style attention.

Heads of one layer are split into groups with different KV lengths; each group's queries/keys are
gathered into a contiguous ``[B, Hg, S, D]`` tensor for one attention call and the outputs are
scattered back into head order. The torch reference (``index_select`` / ``index_copy_``) is the
truth; a Triton kernel does the same strided copy for CUDA tensors (or under
``DCACHE_FORCE_TRITON=1`` with ``TRITON_INTERPRET=1`` on CPU, which is how tests check it).

Example::

    qs = gather_heads(q, torch.tensor([0, 2]))        # [B, 2, S, D]
    scatter_heads(out, attn(qs, ...), torch.tensor([0, 2]))
"""

from __future__ import annotations

import torch

from dcache.kernels._dispatch import use_triton

__all__ = ["as_head_index", "gather_heads", "gather_heads_into", "scatter_heads", "gather_heads_ref", "scatter_heads_ref"]


def gather_heads_ref(x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    return x.index_select(1, heads.to(x.device))


def scatter_heads_ref(out: torch.Tensor, src: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    out.index_copy_(1, heads.to(out.device), src)
    return out


_kernel = None


def _get_kernel():
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _head_copy(src, dst, idx, S, D, HG,
                   ssb, ssh, sss, ssd, dsb, dsh, dss, dsd,
                   SCATTER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_bg = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bg // HG
        g = pid_bg % HG
        h = tl.load(idx + g)
        if SCATTER:
            sh = g
            dh = h
        else:
            sh = h
            dh = g
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        m = (offs_s[:, None] < S) & (offs_d[None, :] < D)
        sp = src + b * ssb + sh * ssh + offs_s[:, None] * sss + offs_d[None, :] * ssd
        dp = dst + b * dsb + dh * dsh + offs_s[:, None] * dss + offs_d[None, :] * dsd
        tl.store(dp, tl.load(sp, mask=m), mask=m)

    _kernel = _head_copy
    return _kernel


def _launch(src: torch.Tensor, dst: torch.Tensor, heads: torch.Tensor, scatter: bool) -> None:
    import triton

    B, _, S, D = src.shape
    HG = heads.numel()
    idx = heads.to(device=src.device, dtype=torch.int32).contiguous()
    BLOCK_S = 32
    BLOCK_D = triton.next_power_of_2(D)
    grid = (B * HG, triton.cdiv(S, BLOCK_S))
    _get_kernel()[grid](src, dst, idx, S, D, HG, *src.stride(), *dst.stride(),
                        SCATTER=scatter, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D)


def as_head_index(heads: torch.Tensor | None) -> torch.Tensor | slice | None:
    """A sorted head list that is one contiguous range becomes a ``slice``: those heads are then read
    and written through views, with no gather or scatter copy."""
    if heads is None or heads.numel() == 0:
        return heads
    lo, hi = int(heads[0]), int(heads[-1])
    if hi - lo + 1 == heads.numel() and bool((heads.diff() == 1).all()):
        return slice(lo, hi + 1)
    return heads


def gather_heads(x: torch.Tensor, heads: torch.Tensor | slice | None) -> torch.Tensor:
    """``x[:, heads]``: a view for ``None`` or a slice, else a new contiguous tensor."""
    if heads is None:
        return x
    if isinstance(heads, slice):
        return x[:, heads]
    if use_triton(x):
        out = torch.empty((x.shape[0], heads.numel(), *x.shape[2:]), dtype=x.dtype, device=x.device)
        _launch(x, out, heads, scatter=False)
        return out
    return gather_heads_ref(x, heads)


def gather_heads_into(dst: torch.Tensor, src: torch.Tensor, heads: torch.Tensor | slice | None) -> None:
    """Write ``src[:, heads]`` into ``dst[:, :, :S]`` (the chunk slot of a head-group buffer)."""
    S = src.shape[2]
    view = dst[:, :, :S]
    if heads is None:
        view.copy_(src)
    elif isinstance(heads, slice):
        view.copy_(src[:, heads])
    elif use_triton(src, dst):
        _launch(src, view, heads, scatter=False)
    else:
        view.copy_(gather_heads_ref(src, heads))


def scatter_heads(out: torch.Tensor, src: torch.Tensor, heads: torch.Tensor | slice | None) -> torch.Tensor:
    """``out[:, heads] = src`` in place; returns ``out``."""
    if heads is None:
        out.copy_(src)
        return out
    if isinstance(heads, slice):
        out[:, heads].copy_(src)
        return out
    if use_triton(out, src):
        _launch(src, out, heads, scatter=True)
        return out
    return scatter_heads_ref(out, src, heads)
