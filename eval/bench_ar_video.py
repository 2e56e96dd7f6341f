"""``dcache bench --task ar-video``: KV-cache policies for autoregressive video, side by side.

For every policy the same prompts and seeds are generated; rows report

* ``fps_denoise``: latent frames per second of the chunk loop only (all denoising forwards and
  the clean commit passes; no prompt encoding, no decoding). This is Forcing-KV's FPS definition
  without its x4 for the VAE's temporal stride (our reference model has no temporal compression).
* ``fps_end_to_end``: frames per second of the whole call: prompt encoding + chunk loop + decode.
* ``kv_bytes``: exact allocated bytes of the self-attention KV history (K and V, all layers;
  the current-chunk slot, identical for every policy, is excluded and reported as ``chunk_slot_bytes``).
* ``peak_mem_bytes``: CUDA: ``torch.cuda.max_memory_allocated`` during one generation minus the
  memory allocated before it. CPU: peak of live bytes allocated by torch during one generation,
  from the torch profiler's allocation events (weights and other pre-existing tensors excluded).
* ``psnr_vs_full``: PSNR of the decoded frames against ``kv-full`` with the same seed (pixels in
  [0, 1] for the reference model; data range of the full output for random weights).
  ``null`` in the JSON when the frames are identical (always for ``kv-full`` itself).
* ``speedup``: ``fps_denoise`` / ``fps_denoise`` of ``kv-full`` (measured in the same run).

Example::

    dcache bench --task ar-video --num-frames 24 --prompts 4 --out results/ar_video
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile

import torch

DEFAULT_POLICIES = "kv-full,kv-rolling,forcing-kv"

# Wan2.1-T2V-1.3B shapes as used by Self-Forcing (random weights: speed and memory only)
SELF_FORCING_SHAPES = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                           text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, rope_max_seq_len=1024)


def _parse(argv):
    ap = argparse.ArgumentParser(prog="dcache bench --task ar-video", description="Compare AR-video KV-cache policies against kv-full.")
    ap.add_argument("--model", default="reference", help="'reference' (shipped trained model), a local pipeline dir, or 'self-forcing-random' (Wan 1.3B shapes, random weights)")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma list (default {DEFAULT_POLICIES}); kv-full is always run")
    ap.add_argument("--num-frames", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per policy and prompt (median is used)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--latent-hw", default=None, help="HxW latent size for random-weight models (default 60x104)")
    ap.add_argument("--sink-frames", type=int, default=1)
    ap.add_argument("--window-frames", type=int, default=6, help="kv-rolling window")
    ap.add_argument("--head-file", default=None, help="forcing-kv head file (default: the model's own)")
    ap.add_argument("--static-ctx-frames", type=int, default=1)
    ap.add_argument("--dynamic-ring-frames", type=int, default=1)
    ap.add_argument("--dynamic-budget-frames", type=int, default=1)
    ap.add_argument("--num-segments", type=int, default=None, help="forcing-kv segments per frame (default: the policy's, 6 or the largest divisor of the tokens per frame below 6)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    ap.add_argument("--out", default="results/bench_ar_video")
    return ap.parse_args(argv)


def _policy_options(name, a):
    if name == "kv-rolling":
        return dict(sink_frames=a.sink_frames, window_frames=a.window_frames)
    if name == "forcing-kv":
        opts = dict(sink_frames=a.sink_frames, static_ctx_frames=a.static_ctx_frames, dynamic_ring_frames=a.dynamic_ring_frames,
                    dynamic_budget_frames=a.dynamic_budget_frames)
        if a.num_segments is not None:
            opts["num_segments"] = a.num_segments
        if a.head_file:
            opts["head_file"] = a.head_file
        return opts
    return {}


def _load(a, dtype):
    if a.model == "self-forcing-random":
        from diffusers import WanTransformer3DModel

        from dcache.pipelines.ar_video.pipeline import ARVideoConfig, ARVideoPipeline
        from dcache.schedulers._forcing_heads import HeadSplit, save_head_file

        h, w = (int(s) for s in (a.latent_hw or "60x104").split("x"))
        torch.manual_seed(0)
        with torch.device(a.device):
            tr = WanTransformer3DModel(**SELF_FORCING_SHAPES).to(dtype).eval()
        L, H = SELF_FORCING_SHAPES["num_layers"], SELF_FORCING_SHAPES["num_attention_heads"]
        head = os.path.join(tempfile.mkdtemp(), "heads_half.json")
        # random weights have no head structure: a rank-style half split (Krea-14B file shape), speed only
        save_head_file(HeadSplit(L, H, [list(range(H // 2))] * L, [list(range(H // 2, H))] * L), head, profile="synthetic-half")
        pipe = ARVideoPipeline(tr, ARVideoConfig(height=h, width=w), head_file=head)
        g = torch.Generator().manual_seed(0)
        embs = [torch.randn(1, 512, 4096, generator=g) * 0.1 for _ in range(a.prompts)]
        return pipe, [(e, None) for e in embs], "latent"
    from dcache.pipelines.ar_video.reference import load_reference, sample_prompts

    pipe = load_reference(None if a.model == "reference" else a.model, torch_dtype=dtype)
    pipe.transformer.to(a.device)
    return pipe, [(None, [p]) for p in sample_prompts(a.prompts, a.seed)], "pixels"


def _psnr(x, ref, data_range):
    mse = torch.mean((x.double() - ref.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def _peak_memory(pipe, call):
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    ev = sorted((e for e in prof.events() if e.cpu_memory_usage and not e.cpu_children), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in ev:
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return peak


def main(argv: list[str]) -> int:
    from tqdm import tqdm

    import dcache

    a = _parse(argv)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if a.device == "cuda" else torch.float32)
    names = [p.strip() for p in a.policies.split(",") if p.strip()]
    if "kv-full" in names:
        names.remove("kv-full")
    names = ["kv-full"] + names
    for n in names:
        dcache.registry.get_policy(n, "ar-video")  # clear error for unknown names
    pipe, prompts, kind = _load(a, dtype)
    os.makedirs(a.out, exist_ok=True)

    def gen(emb, prompt, seed):
        return pipe(prompt_embeds=emb, prompt=prompt, num_frames=a.num_frames, seed=seed)

    # warm-up (allocator, kernels) outside the timed region
    dcache.accelerate(pipe, policy="kv-full")
    gen(*prompts[0], a.seed)
    times = {n: [] for n in names}
    e2e = {n: [] for n in names}
    psnrs = {n: [] for n in names}
    per_chunk = {n: [] for n in names}  # PSNR per chunk, averaged over prompts: where the drift starts
    stats = {}
    bar = tqdm(total=len(prompts) * len(names) * a.repeats, desc="ar-video bench", file=sys.stderr)
    for pi, (emb, prompt) in enumerate(prompts):
        seed = a.seed + pi
        ref = None
        for r in range(a.repeats):
            for n in names:  # interleaved so that machine noise hits every policy alike
                dcache.accelerate(pipe, policy=n, **_policy_options(n, a))
                out = gen(emb, prompt, seed)
                times[n].append(out.timings["denoise_s"])
                e2e[n].append(out.timings["end_to_end_s"])
                if r == 0:
                    frames = out.frames.float().cpu()
                    if n == "kv-full":
                        ref = frames
                        rng = 1.0 if kind == "pixels" else float(ref.max() - ref.min())
                    if kind == "pixels":
                        frames = frames.clamp(0, 1)
                    r_ = ref.clamp(0, 1) if kind == "pixels" else ref
                    psnrs[n].append(_psnr(frames, r_, rng))
                    C = pipe.config.chunk_frames
                    per_chunk[n].append([_psnr(frames[:, :, c : c + C], r_[:, :, c : c + C], rng) for c in range(0, a.num_frames, C)])
                    stats[n] = pipe.dcache.stats()
                bar.update(1)
    bar.close()
    peaks = {}
    if not a.no_memory:
        for n in names:
            dcache.accelerate(pipe, policy=n, **_policy_options(n, a))
            peaks[n] = _peak_memory(pipe, lambda: gen(*prompts[0], a.seed))
    dcache.disable(pipe)
    nfr = a.num_frames
    fps_full = nfr / statistics.median(times["kv-full"])
    rows = []
    for n in names:
        fps = nfr / statistics.median(times[n])
        s = stats[n]
        finite = [p for p in psnrs[n] if math.isfinite(p)]
        rows.append({
            "policy": n,
            "fps_denoise": round(fps, 3),
            "fps_end_to_end": round(nfr / statistics.median(e2e[n]), 3),
            "kv_bytes": s["kv_bytes"],
            "peak_mem_bytes": peaks.get(n),
            "psnr_vs_full": (round(min(finite), 2) if len(finite) == len(psnrs[n]) else float("inf")) if n != "kv-full" else float("inf"),
            "psnr_vs_full_mean": round(statistics.mean(finite), 2) if finite and len(finite) == len(psnrs[n]) else float("inf"),
            "speedup": round(fps / fps_full, 3),
            "psnr_vs_full_per_chunk": [round(statistics.mean(col), 1) if all(map(math.isfinite, col)) else float("inf")
                                       for col in zip(*per_chunk[n])],
            "kv_reduction": round(1 - s["kv_bytes"] / stats["kv-full"]["kv_bytes"], 4),
            "mean_keys_per_head": round(s["mean_keys_per_head"], 1),
            "chunk_slot_bytes": s["chunk_slot_bytes"],
            "options": _policy_options(n, a),
            "model": a.model, "num_frames": nfr, "prompts": len(prompts), "repeats": a.repeats,
            "device": str(pipe.device), "dtype": str(dtype).replace("torch.", ""), "threads": a.threads,
        })
    # JSON has no infinity: identical outputs (PSNR = inf) are written as null
    def _finite(v):
        if isinstance(v, list):
            return [_finite(x) for x in v]
        return None if isinstance(v, float) and math.isinf(v) else v

    clean = [{k: _finite(v) for k, v in r.items()} for r in rows]
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(clean, f, indent=1, default=str)
    cols = ["policy", "fps_denoise", "fps_end_to_end", "kv_bytes", "peak_mem_bytes", "psnr_vs_full", "speedup", "kv_reduction", "mean_keys_per_head"]
    print(" | ".join(f"{c:>14s}" for c in cols))
    for r in rows:
        print(" | ".join(f"{str(r[c]):>14s}" for c in cols))
    print(f"wrote {os.path.join(a.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
