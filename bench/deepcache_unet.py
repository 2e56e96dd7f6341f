"""DeepCache on a random-init SD-1.x-shaped UNet pipeline, CPU: inner-call drop, speed and overhead.

A real ``StableDiffusionPipeline`` (random-init ``UNet2DConditionModel`` with SD 1.x's block
layout at reduced width, DDIM, batched CFG, prompt embeddings passed in, latents out so the VAE
is not timed). Configurations, timed interleaved (plain, a, b, ..., plain, a, b, ...), median and
(min, max) of wall clock and of this process's CPU time:

* ``plain`` — no dcache;
* ``none`` — dcache installed with policy ``none`` (hook overhead);
* ``deepcache(cache_interval=1)`` — every step full: DeepCache's machinery with nothing skipped,
  i.e. its overhead;
* DeepCache at several intervals / branches / schedules.

Per configuration: calls of a leaf layer in each UNet part (down block 0, the last down block,
the mid block, up block 0, the last up block), dcache's FLOP estimate, and how far the final
latents move from the plain run (relative L2 error, PSNR over the plain latents' range). The
weights are random, so the latent error only grounds the comparison (a coarser setting must move
further), it is not image quality.

    OMP_NUM_THREADS=1 python bench/deepcache_unet.py --threads 1 [--repeats 5] [--steps 20]

Writes ``bench/results/unet/deepcache_unet.json`` and ``.md``.
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

CONFIGS = [
    ("plain", None, {}),
    ("none", "none", {}),
    ("deepcache(cache_interval=1)", "deepcache", dict(cache_interval=1)),
    ("deepcache", "deepcache", {}),
    ("deepcache(cache_branch_id=2)", "deepcache", dict(cache_branch_id=2)),
    ("deepcache(cache_interval=5)", "deepcache", dict(cache_interval=5)),
    ("deepcache(schedule=non-uniform)", "deepcache", dict(schedule="non-uniform")),
]


def build(width: int, latent: int):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    w = width
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(w, 2 * w, 4 * w, 4 * w),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=min(32, w)).eval()
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def leaf_counters(unet: torch.nn.Module) -> tuple[dict[str, int], list]:
    parts = {"down_blocks.0": unet.down_blocks[0], f"down_blocks.{len(unet.down_blocks) - 1}": unet.down_blocks[-1],
             "mid_block": unet.mid_block, "up_blocks.0": unet.up_blocks[0],
             f"up_blocks.{len(unet.up_blocks) - 1}": unet.up_blocks[-1]}
    counts = {k: 0 for k in parts}
    handles = []
    for k, m in parts.items():
        conv = m.resnets[0].conv1

        def hook(*a, k=k):
            counts[k] += 1

        handles.append(conv.register_forward_hook(hook))
    return counts, handles


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=32, help="channels of the first block (SD 1.x: 320)")
    ap.add_argument("--latent", type=int, default=16, help="latent side (SD 1.x at 512 px: 64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "unet"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = build(a.width, a.latent)
    unet = pipe.unet
    torch.manual_seed(1)
    kw = dict(prompt_embeds=torch.randn(1, 16, 64), negative_prompt_embeds=torch.randn(1, 16, 64),
              height=pipe.vae_scale_factor * a.latent, width=pipe.vae_scale_factor * a.latent, guidance_scale=7.5,
              output_type="latent",
              num_inference_steps=a.steps)

    def generate():
        with torch.no_grad():
            return pipe(generator=torch.Generator().manual_seed(0), **kw).images

    def install(policy, opts):
        dcache.disable(pipe)
        if policy is not None:
            dcache.accelerate(pipe, policy, **opts)

    # Untimed pass per configuration: outputs, counts, FLOP estimate (and warm-up).
    rows = {}
    ref = None
    for label, policy, opts in CONFIGS:
        install(policy, opts)
        counts, handles = leaf_counters(unet)
        out = generate()
        for h in handles:
            h.remove()
        stats = pipe.dcache.stats() if policy is not None else {}
        if ref is None:
            ref = out
        err = float((out - ref).norm() / ref.norm())
        mse = float(((out - ref) ** 2).mean())
        rng = float(ref.max() - ref.min())
        rows[label] = dict(policy=policy or "plain", options=opts, leaf_calls=dict(counts),
                           estimated_speedup=stats.get("estimated_speedup", 1.0),
                           reused=stats.get("reused", 0), rel_l2_error=err,
                           psnr_latent=float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(rng ** 2 / mse)).item(),
                           wall=[], cpu=[])
    print(f"untimed pass done; latents {tuple(ref.shape)}", flush=True)
    for rnd in range(a.repeats):
        print(f"round {rnd + 1}/{a.repeats}", flush=True)
        for label, policy, opts in CONFIGS:
            install(policy, opts)
            t0, c0 = time.perf_counter(), time.process_time()
            generate()
            rows[label]["wall"].append(time.perf_counter() - t0)
            rows[label]["cpu"].append(time.process_time() - c0)
    install(None, {})
    base_w = statistics.median(rows["plain"]["wall"])
    base_c = statistics.median(rows["plain"]["cpu"])
    for r in rows.values():
        for k in ("wall", "cpu"):
            r[f"{k}_median_s"] = statistics.median(r[k])
            r[f"{k}_min_s"], r[f"{k}_max_s"] = min(r[k]), max(r[k])
        r["speedup_wall"] = base_w / r["wall_median_s"]
        r["speedup_cpu"] = base_c / r["cpu_median_s"]
    meta = dict(command="OMP_NUM_THREADS=1 python bench/deepcache_unet.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                threads=a.threads, repeats=a.repeats, steps=a.steps, width=a.width, latent=a.latent,
                cfg="batched (guidance 7.5)", torch=torch.__version__, python=platform.python_version(),
                unet_params=sum(p.numel() for p in unet.parameters()))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "deepcache_unet.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    parts = list(next(iter(rows.values()))["leaf_calls"])
    lines = [f"DeepCache on a random-init SD-1.x-shaped UNet ({meta['unet_params'] / 1e6:.1f} M params, width "
             f"{a.width}, latent {a.latent}², {a.steps} DDIM steps, batched CFG), {a.threads} thread, "
             f"{a.repeats} interleaved rounds; `{meta['command']}`", "",
             "| config | wall s (min–max) | speedup wall | CPU s (min–max) | speedup CPU | est. FLOP speedup | "
             + " | ".join(f"calls {p}" for p in parts) + " | latent rel. L2 err | latent PSNR dB |",
             "|---|---|---|---|---|---|" + "---|" * len(parts) + "---|---|"]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['wall_median_s']:.3f} ({r['wall_min_s']:.3f}–{r['wall_max_s']:.3f}) | {r['speedup_wall']:.2f} | "
            f"{r['cpu_median_s']:.3f} ({r['cpu_min_s']:.3f}–{r['cpu_max_s']:.3f}) | {r['speedup_cpu']:.2f} | "
            f"{r['estimated_speedup']:.2f} | " + " | ".join(str(r["leaf_calls"][p]) for p in parts)
            + f" | {r['rel_l2_error']:.4f} | {r['psnr_latent']:.1f} |")
    with open(os.path.join(a.out, "deepcache_unet.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
