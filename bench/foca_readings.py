"""Which reading of FoCa's F'(x_k) to ship: PSNR against the uncached output on the embedded scenes model.

The paper's BDF2 predictor needs F'(x_k), the derivative at the newest window value; the
history offers three estimates. This script swaps the torch reference of ``kernels.foca`` for
each reading in turn (DCACHE_DISABLE_TRITON keeps every call on the torch path) and prints the
mean per-image PSNR against the uncached images:

* ``anchor``  (shipped): F'(x_k) = the derivative at the last computed step;
* ``window``: F'(x_k) = F_k - F_{k-1}, the window's backward difference;
* ``at-full``: a corrector anchored at the last computed value, F_full + e/2·(F'_full + F_k - F_{k-1})
  (the shape cache-dit's calibrator documents, shared/reference/cache-dit.md).

    OMP_NUM_THREADS=1 DCACHE_DISABLE_TRITON=1 python bench/foca_readings.py --intervals 4,6 --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["DCACHE_DISABLE_TRITON"] = "1"

import torch  # noqa: E402

import dcache  # noqa: E402
from dcache.kernels import foca as ops  # noqa: E402


def _advance(hist: torch.Tensor, out: torch.Tensor, out_dtype) -> torch.Tensor:
    hist[ops.PREV].copy_(hist[ops.CUR])
    hist[ops.CUR].copy_(out)
    return out.to(out_dtype or hist.dtype)


def window(hist, h, out_dtype=None, codes=None, k_full=0.0):
    cur, prev, _, dfull = (hist[i].float() for i in range(ops.SLOTS))
    pred = 4 / 3 * cur - 1 / 3 * prev + 2 * h / 3 * (cur - prev)
    return _advance(hist, cur + h / 2 * (dfull + (pred - cur) / h), out_dtype)


def at_full(hist, h, out_dtype=None, codes=None, k_full=0.0):
    cur, prev, full, dfull = (hist[i].float() for i in range(ops.SLOTS))
    return _advance(hist, full + k_full / 2 * (dfull + cur - prev), out_dtype)


READINGS = {"anchor": ops.forecast_torch, "window": window, "at-full": at_full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--intervals", default="4,6")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from dcache.eval.bench_image import make_target

    target = make_target("scenes", 4.0, "cpu")
    pipe = target.pipe
    seeds = [int(s) for s in args.seeds.split(",")]

    def generate() -> torch.Tensor:
        return target.generate(seeds, args.steps)

    def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((10 * torch.log10(1 / ((a - b) ** 2).flatten(1).mean(1))).mean())

    base = generate()
    for interval in (int(i) for i in args.intervals.split(",")):
        for name, fn in READINGS.items():
            ops.forecast_torch = fn
            try:
                with dcache.accelerated(pipe, "foca", interval=interval):
                    print(f"foca interval={interval} reading={name}: {psnr(generate(), base):.2f} dB", flush=True)
            finally:
                ops.forecast_torch = READINGS["anchor"]
        with dcache.accelerated(pipe, "taylorseer", interval=interval, order=1):
            print(f"taylorseer interval={interval} order=1: {psnr(generate(), base):.2f} dB", flush=True)


if __name__ == "__main__":
    main()
