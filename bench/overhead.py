"""dcache's own overhead on a medium-sized Flux transformer, CPU, measured side by side.

(a) policy ``none`` (every hook installed, nothing skipped) against the plain pipeline — target ≤ 2%.
(b) a fully reused denoiser call against a full call — target ≤ 5%.

Runs alternate (plain, none, plain, none, ...) so drift in machine load hits both sides alike;
the figures are medians. Writes ``bench/results/overhead.json``.

    python bench/overhead.py [--repeats 7] [--steps 12] [--out bench/results/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import dcache  # noqa: E402


def build(hidden_heads: int, layers: int, single_layers: int):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers,
                                attention_head_dim=64, num_attention_heads=hidden_heads, joint_attention_dim=128,
                                pooled_projection_dim=128, axes_dims_rope=[16, 24, 24]).eval()
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                        latent_channels=16, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class CallTimer:
    """Wall time of every denoiser call, taken around the whole module call (dcache's hooks included)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.times: list[float] = []
        self._t0 = 0.0
        self.h1 = module.register_forward_pre_hook(self._pre)
        self.h2 = module.register_forward_hook(self._post)

    def _pre(self, *a) -> None:
        self._t0 = time.perf_counter()

    def _post(self, *a) -> None:
        self.times.append(time.perf_counter() - self._t0)

    def remove(self) -> None:
        self.h1.remove()
        self.h2.remove()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (tokens = (size/2)^2)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads of 64 channels")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--single-layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "overhead.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = build(args.heads, args.layers, args.single_layers)
    torch.manual_seed(1)
    kw = dict(prompt_embeds=torch.randn(1, 32, 128), pooled_prompt_embeds=torch.randn(1, 128), height=args.size,
              width=args.size, num_inference_steps=args.steps, guidance_scale=3.5, output_type="pt")

    def generate() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(generator=torch.Generator().manual_seed(0), **kw)
        return time.perf_counter() - t0

    # Warm-up: first calls allocate, and dcache measures FLOPs once per input shape.
    generate()
    dcache.accelerate(pipe, "none")
    generate()
    dcache.disable(pipe)

    plain, none = [], []
    for _ in range(args.repeats):
        plain.append(generate())
        dcache.accelerate(pipe, "none")
        none.append(generate())
        dcache.disable(pipe)

    # (b): one full call then reused calls only (static with an interval longer than the run).
    full_calls, reused_calls = [], []
    for _ in range(args.repeats):
        timer = CallTimer(pipe.transformer)
        generate()
        full_calls.extend(timer.times)
        timer.remove()
        dcache.accelerate(pipe, "static", interval=10**6, warmup_steps=1, compute_last=False)
        timer = CallTimer(pipe.transformer)
        generate()
        reused_calls.extend(timer.times[1:])
        assert pipe.dcache.stats()["reused"] == args.steps - 1
        timer.remove()
        dcache.disable(pipe)

    med = statistics.median
    tokens = (args.size // 2) ** 2
    result = {
        "benchmark": "overhead",
        "device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads",
        "model": f"FluxTransformer2DModel hidden {64 * args.heads}, {args.layers}+{args.single_layers} blocks, "
                 f"{tokens} image tokens + 32 text tokens",
        "params_M": round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e6, 2),
        "steps": args.steps,
        "repeats": args.repeats,
        "plain_generation_s": med(plain),
        "none_generation_s": med(none),
        "none_overhead_ratio": med(none) / med(plain),
        "none_overhead_target": 1.02,
        "full_call_s": med(full_calls),
        "reused_call_s": med(reused_calls),
        "reused_vs_full_ratio": med(reused_calls) / med(full_calls),
        "reused_vs_full_target": 0.05,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
