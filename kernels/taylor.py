"""Taylor/finite-difference history: forecast a feature from its terms, refresh the terms.

Terms are stored stacked, ``terms[i]`` ≈ the i-th derivative of the feature with respect to the
step index (TaylorSeer, arXiv 2503.06923: divided differences over the distance between the last
two computed steps). Both ops are memory-bound, so the Triton versions do each in one pass: the
forecast reads every term once and writes the value; the update reads the new value and the old
terms once and writes the new terms in place.
"""

from __future__ import annotations

import functools

import math

import torch

from dcache.kernels._dispatch import use_triton

MAX_TERMS = 5  # orders 0..4


def forecast_coefficients(n_valid: int, k: float) -> list[float]:
    return [k**i / math.factorial(i) for i in range(n_valid)]


# ---------------------------------------------------------------------------------------------
# torch reference (the truth)
# ---------------------------------------------------------------------------------------------
def forecast_torch(terms: torch.Tensor, n_valid: int, k: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    coeffs = forecast_coefficients(n_valid, k)
    out_dtype = out_dtype or terms.dtype
    if terms.dtype == torch.float32 or n_valid == 1:
        # One fresh tensor, then in-place accumulation: n_valid passes, no temporaries.
        acc = terms[0].to(out_dtype if n_valid == 1 else torch.float32, copy=True)
        for i in range(1, n_valid):
            acc.add_(terms[i], alpha=coeffs[i])
        return acc.to(out_dtype)
    acc = terms[0].float()
    for i in range(1, n_valid):
        acc = acc + terms[i].float() * coeffs[i]
    return acc.to(out_dtype)


def update_torch(terms: torch.Tensor, n_valid: int, value: torch.Tensor, distance: float) -> int:
    """Refresh ``terms`` in place with a newly computed ``value``; return the new number of valid terms."""
    order_cap = terms.shape[0]
    new_valid = min(n_valid + 1, order_cap)
    prev_new = value.float()
    for i in range(new_valid):
        # A copy: for float32 terms ``.float()`` is the same storage the next line overwrites.
        old = terms[i].float().clone() if i < n_valid else None
        terms[i].copy_(prev_new)
        if old is None or i + 1 >= new_valid:
            break
        prev_new = (prev_new - old) / distance
    return new_valid


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@functools.cache  # built on first use: importing triton must follow TRITON_INTERPRET
def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def _forecast_kernel(T, OUT, n, c0, c1, c2, c3, c4, NT: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.load(T + offs, mask=mask, other=0.0).to(tl.float32) * c0
        if NT > 1:
            acc += tl.load(T + n + offs, mask=mask, other=0.0).to(tl.float32) * c1
        if NT > 2:
            acc += tl.load(T + 2 * n + offs, mask=mask, other=0.0).to(tl.float32) * c2
        if NT > 3:
            acc += tl.load(T + 3 * n + offs, mask=mask, other=0.0).to(tl.float32) * c3
        if NT > 4:
            acc += tl.load(T + 4 * n + offs, mask=mask, other=0.0).to(tl.float32) * c4
        tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _update_kernel(T, X, n, inv_d, NV: tl.constexpr, NEW: tl.constexpr, BLOCK: tl.constexpr):
        # NV: terms valid before, NEW: terms valid after (NV + 1, capped).
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        cur = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        for i in tl.static_range(NEW):
            if i < NV:
                old = tl.load(T + i * n + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(T + i * n + offs, cur.to(T.dtype.element_ty), mask=mask)
            if i < NV:
                cur = (cur - old) * inv_d

    return (_forecast_kernel, _update_kernel)


_BLOCK = 1024


def forecast_triton(terms: torch.Tensor, n_valid: int, k: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    import triton

    fk, _ = _build()
    terms = terms.contiguous()
    n = terms[0].numel()
    out = torch.empty(terms.shape[1:], dtype=out_dtype or terms.dtype, device=terms.device)
    c = forecast_coefficients(n_valid, k) + [0.0] * (MAX_TERMS - n_valid)
    fk[(triton.cdiv(n, _BLOCK),)](terms, out, n, *c, NT=n_valid, BLOCK=_BLOCK)
    return out


def update_triton(terms: torch.Tensor, n_valid: int, value: torch.Tensor, distance: float) -> int:
    import triton

    _, uk = _build()
    if not terms.is_contiguous():
        raise ValueError("terms must be contiguous")
    value = value.contiguous()
    n = value.numel()
    new_valid = min(n_valid + 1, terms.shape[0])
    uk[(triton.cdiv(n, _BLOCK),)](terms, value, n, 1.0 / distance, NV=n_valid, NEW=new_valid, BLOCK=_BLOCK)
    return new_valid


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def forecast(terms: torch.Tensor, n_valid: int, k: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Σ_i terms[i] · k^i / i! over the first ``n_valid`` terms."""
    if not 1 <= n_valid <= min(terms.shape[0], MAX_TERMS):
        raise ValueError(f"n_valid must be in 1..{min(terms.shape[0], MAX_TERMS)}, got {n_valid}")
    if use_triton(terms):
        return forecast_triton(terms, n_valid, k, out_dtype)
    return forecast_torch(terms, n_valid, k, out_dtype)


def update(terms: torch.Tensor, n_valid: int, value: torch.Tensor, distance: float) -> int:
    """Write ``value`` as term 0 and the divided differences as the higher terms, in place."""
    if terms.shape[1:] != value.shape:
        raise ValueError(f"value shape {tuple(value.shape)} does not match terms {tuple(terms.shape[1:])}")
    if terms.shape[0] > MAX_TERMS:
        raise ValueError(f"at most {MAX_TERMS} terms (order {MAX_TERMS - 1}) are supported")
    if distance <= 0:
        raise ValueError(f"distance between computed steps must be positive, got {distance}")
    if use_triton(terms, value):
        return update_triton(terms, n_valid, value, distance)
    return update_torch(terms, n_valid, value, distance)
