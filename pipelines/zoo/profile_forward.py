"""How much of one transformer forward is spent inside the blocks' attention and MLP modules.

Module-level caching (TaylorSeer, FoCa) skips exactly these modules, so this fraction bounds the
wall-clock speedup such a policy can reach. Usage::

    python -m dcache.pipelines.zoo.profile_forward --batch 1 4 8 --threads 1
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from .digits_model import image_ids, pack, text_ids
from .reference import load_reference_pipeline

# Submodules of FluxTransformerBlock / FluxSingleTransformerBlock that hold the heavy compute.
SITES = ("attn", "ff", "ff_context", "proj_mlp", "act_mlp", "proj_out")


def profile(batch: int, reps: int = 5, pipe=None) -> dict:
    pipe = pipe or load_reference_pipeline()
    tr = pipe.transformer
    size = pipe.config.image_size
    tokens, pooled = pipe.class_embedder(torch.zeros(batch, dtype=torch.long))
    kwargs = dict(
        hidden_states=pack(torch.randn(batch, 1, size, size)), encoder_hidden_states=tokens, pooled_projections=pooled,
        timestep=torch.full((batch,), 0.5), img_ids=image_ids(size, size), txt_ids=text_ids(tokens.shape[1]),
        return_dict=False,
    )
    spent: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}
    handles = []
    for name, module in tr.named_modules():
        parts = name.split(".")
        if len(parts) == 3 and parts[0] in ("transformer_blocks", "single_transformer_blocks") and parts[2] in SITES:
            key = f"{parts[0]}.{parts[2]}"
            handles.append(module.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda m, a, o, key=key: spent.__setitem__(key, spent[key] + time.perf_counter() - starts[id(m)])))
    try:
        with torch.no_grad():
            tr(**kwargs)
            spent.clear()
            t0 = time.perf_counter()
            for _ in range(reps):
                tr(**kwargs)
            total = (time.perf_counter() - t0) / reps
    finally:
        for h in handles:
            h.remove()
    inside = sum(spent.values()) / reps
    return {"batch": batch, "forward_ms": 1000 * total, "fraction_in_attn_mlp": inside / total,
            "by_site_ms": {k: 1000 * v / reps for k, v in sorted(spent.items())}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_reference_pipeline()
    for b in args.batch:
        print(json.dumps(profile(b, args.reps, pipe)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
