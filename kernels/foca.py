"""FoCa's forecast-then-calibrate math (arXiv 2508.16211) as fused elementwise ops.

One site's history is a stacked tensor ``hist`` of shape ``(4, *feature_shape)``:

====  =========  ===========================================================================
slot  name       meaning
====  =========  ===========================================================================
0     ``cur``    F_k, the site's value at the most recent step (computed *or* forecast)
1     ``prev``   F_{k-1}, the value one window step before (computed or forecast)
2     ``full``   F_full, the value at the last fully computed step (the anchor)
3     ``dfull``  F'(x_{k-N}), the derivative per step at the anchor: divided difference of
                 the last two computed values over their distance in steps
====  =========  ===========================================================================

Forecast for the step ``h`` steps after ``cur``: the paper's equations (shared/reference/
caching-algorithms.md §3.1), with F'(x_k) in the predictor taken as the derivative at the last
computed step, the only derivative the history holds that no forecast has touched:

    P     = 4/3 cur - 1/3 prev + 2h/3 dfull                     explicit BDF2 predictor
    d_P   = (P - cur) / h                                       derivative the predictor implies at k+1
    F_c   = cur + h/2 (dfull + d_P)                             Heun (trapezoidal) corrector

then the window advances (``prev <- cur``, ``cur <- F_c``), so the next forecast extrapolates from
the last two values, cached or computed, as the paper prescribes, while the corrector stays
anchored to the derivative of the last computed step. Folded: F_c = 7/6 cur - 1/6 prev + 5h/6 dfull.
(Estimating F'(x_k) instead by the window's backward difference (cur - prev) carries each
window's forecast error, through the first difference after a computed step, into the next
window undamped; on the embedded scenes model that cost 8-14 dB PSNR at intervals 4-6, see
docs/policies/foca.md.)

Calibrate with a freshly computed value ``x`` (``gap``: steps since the anchor):
``dfull <- (x - full)/gap``, ``full <- x``, ``prev <- cur``, ``cur <- x``; the first value ever seeds
every slot (``dfull = 0``: until a second computed step the forecast is a plain reuse).

HyCa (``dcache.schedulers.hyca``) picks, per channel, one of three solvers that all read this
same history: 0 = reuse (``full``), 1 = first-order Taylor (``full + k·dfull``, ``k`` steps after
the anchor), 2 = FoCa (``F_c``). ``forecast(..., codes=...)`` selects per channel (last dimension)
in the same pass, still advancing the FoCa window for every channel.

Both ops are memory-bound: the Triton kernels read each slot once and write in place.
"""

from __future__ import annotations

import functools

import torch

from dcache.kernels._dispatch import use_triton

SLOTS = 4
CUR, PREV, FULL, DFULL = range(SLOTS)
REUSE, TAYLOR, FOCA = 0, 1, 2
SOLVERS = ("reuse", "taylor", "foca")


def _coefficients(h: float) -> tuple[float, float, float]:
    """F_c = a·cur + b·prev + c·dfull: the predictor and corrector folded (for the Triton kernel).

    P - cur = (cur - prev)/3 + (2h/3) dfull, so F_c = cur + (h/2) dfull + (cur - prev)/6 + (h/3) dfull.
    """
    return 7.0 / 6.0, -1.0 / 6.0, 5.0 * h / 6.0


# ---------------------------------------------------------------------------------------------
# torch reference (the truth)
# ---------------------------------------------------------------------------------------------
def forecast_torch(hist: torch.Tensor, h: float, out_dtype: torch.dtype | None = None,
                   codes: torch.Tensor | None = None, k_full: float = 0.0) -> torch.Tensor:
    # The folded form (``_coefficients``): 3 passes over the feature instead of 6, since on CPU
    # these features are memory-bound; tests check it against the unfolded formula.
    a, b, c = _coefficients(h)
    if hist.dtype == torch.float32:
        corrected = torch.mul(hist[CUR], a)
        corrected.add_(hist[PREV], alpha=b).add_(hist[DFULL], alpha=c)
    else:
        corrected = hist[CUR].float() * a + hist[PREV].float() * b + hist[DFULL].float() * c
    out = corrected
    if codes is not None:
        full, dfull = hist[FULL].float(), hist[DFULL].float()
        out = torch.where(codes == FOCA, corrected, torch.where(codes == TAYLOR, full + k_full * dfull, full))
    out = out.to(out_dtype or hist.dtype)
    hist[PREV].copy_(hist[CUR])
    hist[CUR].copy_(corrected)
    return out


def reselect(hist: torch.Tensor, codes: torch.Tensor, k_full: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The per-channel output again for the step ``hist[CUR]`` was forecast for, without advancing
    (a second-order scheduler's corrector call at the same step)."""
    _check_hist(hist)
    full, dfull = hist[FULL].float(), hist[DFULL].float()
    out = torch.where(codes == FOCA, hist[CUR].float(), torch.where(codes == TAYLOR, full + k_full * dfull, full))
    return out.to(out_dtype or hist.dtype)


def anchored(hist: torch.Tensor, k_full: float, taylor: torch.Tensor | None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reuse / Taylor only (no FoCa channel, so the window is never read): ``full + k·dfull·taylor``,
    one pass; ``taylor`` is a 0/1 float mask over the last dimension (None: every channel reuses)."""
    _check_hist(hist)
    out_dtype = out_dtype or hist.dtype
    if taylor is None:
        return hist[FULL].to(out_dtype, copy=True)
    out = torch.addcmul(hist[FULL].float(), hist[DFULL].float(), taylor * k_full)
    return out.to(out_dtype)


def calibrate_torch(hist: torch.Tensor, n_full: int, value: torch.Tensor, gap: float) -> int:
    x = value.float()
    if n_full == 0:
        for i in (CUR, PREV, FULL):
            hist[i].copy_(x)
        hist[DFULL].zero_()
        return 1
    hist[DFULL].copy_((x - hist[FULL].float()) / gap)
    hist[FULL].copy_(x)
    hist[PREV].copy_(hist[CUR])
    hist[CUR].copy_(x)
    return n_full + 1


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@functools.cache  # built on first use: importing triton must follow TRITON_INTERPRET
def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def _forecast_kernel(H, OUT, CODES, n, C, a, b, c, k_full, SELECT: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        cur = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        prev = tl.load(H + n + offs, mask=mask, other=0.0).to(tl.float32)
        dfull = tl.load(H + 3 * n + offs, mask=mask, other=0.0).to(tl.float32)
        corrected = a * cur + b * prev + c * dfull
        out = corrected
        if SELECT:
            full = tl.load(H + 2 * n + offs, mask=mask, other=0.0).to(tl.float32)
            code = tl.load(CODES + offs % C, mask=mask, other=2)
            out = tl.where(code == 2, corrected, tl.where(code == 1, full + k_full * dfull, full))
        tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
        tl.store(H + n + offs, cur.to(H.dtype.element_ty), mask=mask)
        tl.store(H + offs, corrected.to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _calibrate_kernel(H, X, n, inv_gap, FIRST: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if FIRST:
            tl.store(H + offs, x.to(H.dtype.element_ty), mask=mask)
            tl.store(H + n + offs, x.to(H.dtype.element_ty), mask=mask)
            tl.store(H + 2 * n + offs, x.to(H.dtype.element_ty), mask=mask)
            tl.store(H + 3 * n + offs, (x * 0.0).to(H.dtype.element_ty), mask=mask)
        else:
            cur = tl.load(H + offs, mask=mask, other=0.0)
            full = tl.load(H + 2 * n + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(H + 3 * n + offs, ((x - full) * inv_gap).to(H.dtype.element_ty), mask=mask)
            tl.store(H + 2 * n + offs, x.to(H.dtype.element_ty), mask=mask)
            tl.store(H + n + offs, cur, mask=mask)
            tl.store(H + offs, x.to(H.dtype.element_ty), mask=mask)

    return (_forecast_kernel, _calibrate_kernel)


_BLOCK = 1024


def forecast_triton(hist: torch.Tensor, h: float, out_dtype: torch.dtype | None = None,
                    codes: torch.Tensor | None = None, k_full: float = 0.0) -> torch.Tensor:
    import triton

    fk, _ = _build()
    n = hist[0].numel()
    out = torch.empty(hist.shape[1:], dtype=out_dtype or hist.dtype, device=hist.device)
    a, b, c = _coefficients(h)
    select = codes is not None
    codes_arg = codes.to(torch.int32).contiguous() if select else hist  # unused pointer when not selecting
    C = hist.shape[-1] if hist.dim() > 1 else 1
    fk[(triton.cdiv(n, _BLOCK),)](hist, out, codes_arg, n, C, a, b, c, float(k_full), SELECT=select, BLOCK=_BLOCK)
    return out


def calibrate_triton(hist: torch.Tensor, n_full: int, value: torch.Tensor, gap: float) -> int:
    import triton

    _, ck = _build()
    value = value.contiguous()
    n = value.numel()
    ck[(triton.cdiv(n, _BLOCK),)](hist, value, n, 1.0 / gap, FIRST=n_full == 0, BLOCK=_BLOCK)
    return n_full + 1


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def _check_hist(hist: torch.Tensor) -> None:
    if hist.dim() < 2 or hist.shape[0] != SLOTS:
        raise ValueError(f"hist must have shape ({SLOTS}, *feature_shape), got {tuple(hist.shape)}")
    if not hist.is_contiguous():
        raise ValueError("hist must be contiguous")


def forecast(hist: torch.Tensor, h: float, out_dtype: torch.dtype | None = None,
             codes: torch.Tensor | None = None, k_full: float = 0.0) -> torch.Tensor:
    """FoCa's value ``h`` steps after ``hist[CUR]`` (window advanced in place); with ``codes``
    (one solver code per channel of the last dimension) each channel takes its own solver."""
    _check_hist(hist)
    if h <= 0:
        raise ValueError(f"forecast distance must be positive, got {h}")
    if codes is not None and (codes.dim() != 1 or codes.numel() != hist.shape[-1]):
        raise ValueError(f"codes must have one entry per channel ({hist.shape[-1]}), got {tuple(codes.shape)}")
    if use_triton(hist):
        return forecast_triton(hist, h, out_dtype, codes, k_full)
    return forecast_torch(hist, h, out_dtype, codes, k_full)


def calibrate(hist: torch.Tensor, n_full: int, value: torch.Tensor, gap: float) -> int:
    """Store a computed ``value`` ``gap`` steps after the anchor; returns the computed-value count."""
    _check_hist(hist)
    if hist.shape[1:] != value.shape:
        raise ValueError(f"value shape {tuple(value.shape)} does not match history {tuple(hist.shape[1:])}")
    if n_full > 0 and gap <= 0:
        raise ValueError(f"distance to the anchor must be positive, got {gap}")
    if use_triton(hist, value):
        return calibrate_triton(hist, n_full, value, gap)
    return calibrate_torch(hist, n_full, value, gap)
