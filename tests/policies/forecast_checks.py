"""Hand computations shared by the forecaster tests: the schedule and FoCa's recursion, restated
from the paper's equations (arXiv 2508.16211; shared/reference/caching-algorithms.md §3.1) in float64."""

import torch


def hand_schedule(n, interval, warmup, compute_last):
    out, last = [], None
    for s in range(n):
        c = last is None or s < warmup or (compute_last and s == n - 1) or s - last >= interval
        out.append(c)
        last = s if c else last
    return out


def hand_foca(schedule, computed_values):
    """Values the site returns at each step: the computed value, or FoCa's forecast from the history."""
    vals = iter(computed_values)
    out = []
    f_k = f_km1 = anchor = None
    d_full = 0.0
    for s, comp in enumerate(schedule):
        if comp:
            x = next(vals).double()
            if anchor is None:
                f_km1 = x
            else:
                d_full = (x - anchor) / (s - anchor_step)  # derivative at the computed step
                f_km1 = f_k
            anchor, anchor_step = x, s
            f_k, k_step = x, s
            out.append(x)
            continue
        h = s - k_step
        predicted = 4 / 3 * f_k - 1 / 3 * f_km1 + 2 * h / 3 * d_full  # explicit BDF2, F'(x_k) = anchor's
        d_next = (predicted - f_k) / h  # derivative the predictor implies at x_{k+1}
        corrected = f_k + h / 2 * (d_full + d_next)  # Heun / trapezoidal corrector
        f_km1 = f_k
        f_k, k_step = corrected, s
        out.append(corrected)
    return out
