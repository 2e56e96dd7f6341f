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
* ``psnr_vs_full``: the worst PSNR over prompts of the generated frames against ``kv-full`` with
  the same seed (``_mean``: the mean; pixels in [0, 1] for the shipped models, data range of the
  full output for random weights). ``null`` in the JSON when the frames are identical (always for
  ``kv-full`` itself).
* ``psnr_vs_gt`` (occlusion world only): the same against the ground-truth clip. The world's first
  chunk is given (image-to-video style), so the rest of the clip is determined; given frames are
  excluded from every PSNR.
* ``attn_mass_kept``: on each row's own rollout, the share of full attention's softmax mass (over
  the whole committed history plus the chunk) that falls on the tokens the policy kept
  (:class:`~dcache.schedulers._kv_probe.AttentionMassProbe`; mean over layers, heads, queries and
  calls; ``history_mass_kept``: the share of the mass on history only). Measured on an untimed pass.
* ``speedup``: ``fps_denoise`` / ``fps_denoise`` of ``kv-full`` (measured in the same run).

Rows are ``--policies`` items (``name`` or ``name(key=value,...)``, :mod:`dcache.eval.policy_spec`),
labelled by that item; bare names take the legacy flags (``--window-frames`` ...). The default on
the occlusion model is the equal-memory comparison ``DEFAULT_POLICIES``. Every row runs the same
prompts, seeds and given chunk; timed repeats are interleaved across rows.

Example::

    dcache bench --task ar-video --num-frames 48 --prompts 4 --out results/ar_video
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

# The equal-memory comparison (see docs/ar_video.md). KV bytes per head, in frame-equivalents of
# the sink + history: kv-rolling(1) = 2, forcing-kv defaults = 2 (static heads) / 3 (dynamic heads),
# kv-rolling(2) = forcing-kv(static_ctx_frames=2) = 3 for every head. Rows that share kv_bytes
# compete; every row runs the same prompts, seeds and given first chunk.
DEFAULT_POLICIES = (
    "kv-full,"
    "kv-rolling(window_frames=1),"
    "kv-rolling(window_frames=2),"
    "kv-rolling(window_frames=6),"
    "forcing-kv,"
    "forcing-kv(dynamic_ring_frames=2,dynamic_budget_frames=0),"
    "forcing-kv(selection=random),"
    "forcing-kv(keep_selected=True),"
    "forcing-kv(static_ctx_frames=2),"
    "forcing-kv(static_ctx_frames=2,selection=random),"
    "forcing-kv(static_ctx_frames=2,keep_selected=True)"
)
LEGACY_POLICIES = "kv-full,kv-rolling,forcing-kv"

# Wan2.1-T2V-1.3B shapes as used by Self-Forcing (random weights: speed and memory only)
SELF_FORCING_SHAPES = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                           text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, rope_max_seq_len=1024)


def _parse(argv):
    ap = argparse.ArgumentParser(prog="dcache bench --task ar-video", description="Compare AR-video KV-cache policies against kv-full.")
    ap.add_argument("--model", default="occlusion",
                    help="'occlusion' (shipped model of the occlusion world: far history matters, first chunk given, PSNR vs ground truth), "
                         "'reference' (shipped moving-digits model, planted recency bias), a local pipeline dir, "
                         "or 'self-forcing-random' (Wan 1.3B shapes, random weights)")
    ap.add_argument("--policies", default=None,
                    help="comma list of name or name(key=value,...); kv-full is always run first. Default: the equal-memory "
                         f"comparison {DEFAULT_POLICIES!r} on occlusion-world models ({LEGACY_POLICIES!r} on others)")
    ap.add_argument("--num-frames", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per policy and prompt (median is used); "
                    "one more, untimed, per policy and prompt measures quality and attention mass")
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
    ap.add_argument("--no-mass", action="store_true", help="skip the attention-mass diagnostic")
    ap.add_argument("--out", default="results/bench_ar_video")
    return ap.parse_args(argv)


def _policy_options(name, a):
    """Options the legacy flags (--window-frames, --static-ctx-frames, ...) give a bare policy name."""
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
    """(pipe, samples, kind); a sample is a dict with emb / prompt / context (given latents) / gt (pixels)."""
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
        return pipe, [dict(emb=e) for e in embs], "latent"
    from dcache.pipelines.ar_video import occlusion, reference

    path = {"reference": reference.reference_dir(), "occlusion": occlusion.occlusion_dir()}.get(a.model, a.model)
    if not os.path.isdir(path):
        raise ValueError(f"--model {a.model!r}: not 'occlusion', 'reference', 'self-forcing-random' or a local directory")
    if occlusion.model_world(path) == "occlusion":
        pipe = occlusion.load_occlusion(path, torch_dtype=dtype)
        pipe.transformer.to(a.device)
        # held-out digits; the first chunk of the ground truth is given, the rest is generated
        lat, prompts, px = occlusion.make_batch(a.prompts, a.num_frames, torch.Generator().manual_seed(a.seed), digit_pool="test")
        K = pipe.config.chunk_frames
        return pipe, [dict(prompt=[p], context=lat[i : i + 1, :, :K], gt=px[i : i + 1]) for i, p in enumerate(prompts)], "pixels"
    pipe = reference.load_reference(path, torch_dtype=dtype)
    pipe.transformer.to(a.device)
    return pipe, [dict(prompt=[p]) for p in reference.sample_prompts(a.prompts, a.seed)], "pixels"


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


def _occlusion_model(model: str) -> bool:
    from dcache.pipelines.ar_video import occlusion

    return model == "occlusion" or (os.path.isdir(model) and occlusion.model_world(model) == "occlusion")


def _rows_spec(a, default: str) -> list[tuple[str, dict, str]]:
    """(policy name, options, label) per row; kv-full first, exactly once."""
    from dcache.eval.policy_spec import format_policy, parse_policies

    rows = []
    for name, given in parse_policies(a.policies or default, task="ar-video"):
        opts = {**_policy_options(name, a), **given}
        label = format_policy(name, given)
        if name == "kv-full" or any(r[2] == label for r in rows):
            continue
        rows.append((name, opts, label))
    return [("kv-full", {}, "kv-full")] + rows


def _markdown(rows: list[dict]) -> str:
    cols = ["label", "kv_bytes", "psnr_vs_gt", "psnr_vs_gt_mean", "psnr_vs_full", "psnr_vs_full_mean", "attn_mass_kept",
            "history_mass_kept", "fps_denoise", "speedup", "peak_mem_bytes"]

    def cell(v):
        return "-" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    from tqdm import tqdm

    import dcache
    from dcache.schedulers._kv_probe import AttentionMassProbe

    a = _parse(argv)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if a.device == "cuda" else torch.float32)
    try:
        spec = _rows_spec(a, DEFAULT_POLICIES if _occlusion_model(a.model) else LEGACY_POLICIES)
        pipe, samples, kind = _load(a, dtype)
    except ValueError as e:  # one line, before any generation
        print(f"dcache bench --task ar-video: {e}", file=sys.stderr)
        return 2
    labels = [r[2] for r in spec]
    os.makedirs(a.out, exist_ok=True)

    def gen(smp, seed):
        return pipe(prompt_embeds=smp.get("emb"), prompt=smp.get("prompt"), num_frames=a.num_frames, seed=seed,
                    context_frames=smp.get("context"))

    def use(row):
        dcache.accelerate(pipe, policy=row[0], **row[1])

    # warm-up (allocator, kernels) outside the timed region
    use(spec[0])
    gen(samples[0], a.seed)
    C = pipe.config.chunk_frames
    K = samples[0]["context"].shape[2] if samples[0].get("context") is not None else 0
    times = {n: [] for n in labels}
    e2e = {n: [] for n in labels}
    psnrs = {n: [] for n in labels}
    gt_psnrs = {n: [] for n in labels}
    per_chunk = {n: [] for n in labels}  # PSNR vs full per chunk, averaged over prompts: where the drift starts
    gt_chunk = {n: [] for n in labels}
    stats = {}
    mass = {n: [] for n in labels}
    hmass = {n: [] for n in labels}
    bar = tqdm(total=len(samples) * len(spec) * (a.repeats + 1), desc="ar-video bench", file=sys.stderr)
    for pi, smp in enumerate(samples):
        seed = a.seed + pi
        ref = None
        # quality pass (untimed; with the attention-mass probe), all rows at the same seed
        for row in spec:
            use(row)
            pipe.cache_hook = None if a.no_mass else AttentionMassProbe
            try:
                out = gen(smp, seed)
            finally:
                pipe.cache_hook = None
            frames = out.frames.float().cpu()
            if row[2] == "kv-full":
                ref = frames
                rng = 1.0 if kind == "pixels" else float(ref.max() - ref.min())
            if kind == "pixels":
                frames = frames.clamp(0, 1)
            r_ = ref.clamp(0, 1) if kind == "pixels" else ref
            n = row[2]
            psnrs[n].append(_psnr(frames[:, :, K:], r_[:, :, K:], rng))
            per_chunk[n].append([_psnr(frames[:, :, c : c + C], r_[:, :, c : c + C], rng) for c in range(K, a.num_frames, C)])
            if smp.get("gt") is not None:
                gt = smp["gt"]
                gt_psnrs[n].append(_psnr(frames[:, :, K:], gt[:, :, K:], 1.0))
                gt_chunk[n].append([_psnr(frames[:, :, c : c + C], gt[:, :, c : c + C], 1.0) for c in range(K, a.num_frames, C)])
            stats[n] = pipe.dcache.stats()
            if not a.no_mass:
                mass[n].append(stats[n]["attn_mass_kept"])
                hmass[n].append(stats[n]["history_mass_kept"])
            bar.update(1)
        for _ in range(a.repeats):
            for row in spec:  # interleaved so that machine noise hits every policy alike
                use(row)
                out = gen(smp, seed)
                times[row[2]].append(out.timings["denoise_s"])
                e2e[row[2]].append(out.timings["end_to_end_s"])
                bar.update(1)
    bar.close()
    peaks = {}
    if not a.no_memory:
        for row in spec:
            use(row)
            peaks[row[2]] = _peak_memory(pipe, lambda: gen(samples[0], a.seed))
    dcache.disable(pipe)
    nfr = a.num_frames
    fps_full = nfr / statistics.median(times["kv-full"])

    def lo_mean(vals):
        fin = [p for p in vals if math.isfinite(p)]
        if not vals:
            return None, None
        if len(fin) < len(vals):  # some prompt identical to the reference: report "identical" (inf)
            return float("inf"), float("inf")
        return round(min(fin), 2), round(statistics.mean(fin), 2)

    def per_col(cols):
        return [round(statistics.mean(c), 1) if all(map(math.isfinite, c)) else float("inf") for c in zip(*cols)]

    rows = []
    for name, opts, n in spec:
        fps = nfr / statistics.median(times[n])
        s = stats[n]
        pmin, pmean = lo_mean(psnrs[n])
        gmin, gmean = lo_mean(gt_psnrs[n])
        rows.append({
            "policy": name,
            "label": n,
            "fps_denoise": round(fps, 3),
            "fps_denoise_spread": [round(nfr / max(times[n]), 3), round(nfr / min(times[n]), 3)],
            "fps_end_to_end": round(nfr / statistics.median(e2e[n]), 3),
            "kv_bytes": s["kv_bytes"],
            "peak_mem_bytes": peaks.get(n),
            "psnr_vs_full": pmin if n != "kv-full" else float("inf"),
            "psnr_vs_full_mean": pmean if n != "kv-full" else float("inf"),
            "psnr_vs_gt": gmin,
            "psnr_vs_gt_mean": gmean,
            "attn_mass_kept": round(statistics.mean(mass[n]), 4) if mass[n] else None,
            "history_mass_kept": round(statistics.mean(hmass[n]), 4) if hmass[n] else None,
            "speedup": round(fps / fps_full, 3),
            "psnr_vs_full_per_chunk": per_col(per_chunk[n]),
            "psnr_vs_gt_per_chunk": per_col(gt_chunk[n]) if gt_chunk[n] else None,
            "kv_reduction": round(1 - s["kv_bytes"] / stats["kv-full"]["kv_bytes"], 4),
            "mean_keys_per_head": round(s["mean_keys_per_head"], 1),
            "chunk_slot_bytes": s["chunk_slot_bytes"],
            "options": opts,
            "model": a.model, "num_frames": nfr, "given_frames": K, "prompts": len(samples), "repeats": a.repeats, "seed": a.seed,
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
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(f"`dcache bench --task ar-video {' '.join(argv)}`: {nfr} frames ({K} given), {len(samples)} prompts, "
                f"{a.repeats} timed repeats, {a.threads} thread(s), {clean[0]['dtype']} on {clean[0]['device']}\n\n")
        f.write(_markdown(clean))
    cols = ["label", "kv_bytes", "psnr_vs_gt", "psnr_vs_full", "attn_mass_kept", "fps_denoise", "speedup"]
    print(" | ".join(cols))
    for r in clean:
        print(" | ".join(str(r[c]) for c in cols))
    print(f"wrote {os.path.join(a.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
