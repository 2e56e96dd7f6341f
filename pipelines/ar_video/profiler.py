"""Offline head profiler for Forcing-KV: which heads are static, which are dynamic.

For each prompt, the pipeline first generates a video with the full cache. Then one dense forward
runs over (clean history up to the profiled chunk, that chunk re-noised to ``sigma``) with the
block-causal mask, and every self-attention layer's post-RoPE q/k are taken. For the queries of the
profiled chunk, softmax(q k^T / sqrt(d)) is summed over each key frame (frame-level attention
mass, averaged over queries, prompts and sigmas). A head's score is

    score = mass(last ``last_k`` key frames) / mass(key frames from ``skip_first`` on)

(``last_k`` = 1 transition frame + the chunk). Heads with score >= ``threshold`` are static (they
look at the newest frame and their own chunk); the rest are dynamic. With ``static_fraction`` set,
each layer instead marks its top-scoring fraction static (a rank split). Statistic and defaults
follow Forcing-KV's released profile (last 4 key frames, threshold 0.8); no code was taken.

Example::

    split = profile_heads(pipe, [emb0, emb1], num_frames=12, out_path="heads.json")
"""

from __future__ import annotations

import math
import os

import torch

from dcache.pipelines.ar_video.pipeline import block_causal_frame_mask
from dcache.schedulers._forcing_heads import HeadSplit, save_head_file

__all__ = ["frame_attention_mass", "scores_to_split", "profile_heads"]


def frame_attention_mass(q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int, query_tokens: slice,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """[H, F_k]: mean over ``query_tokens`` of the attention mass each key frame receives (no mask:
    the profiled queries are the last chunk, which may see every key; ``bias``: the model's additive
    attention bias over the whole sequence, if it has one)."""
    qq = q[:, :, query_tokens].float()
    logits = qq @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias[..., query_tokens, :].float()
    att = torch.softmax(logits, dim=-1)  # [B, H, Lq, Lk]
    B, H, Lq, Lk = att.shape
    mass = att.reshape(B, H, Lq, Lk // tokens_per_frame, tokens_per_frame).sum(-1)
    return mass.mean(dim=(0, 2))


def scores_to_split(scores: torch.Tensor, threshold: float = 0.8, static_fraction: float | None = None) -> HeadSplit:
    """[L, H] scores -> HeadSplit (threshold, or per-layer top ``static_fraction`` by score)."""
    L, H = scores.shape
    static, dynamic = [], []
    for li in range(L):
        if static_fraction is None:
            s = [h for h in range(H) if scores[li, h] >= threshold]
        else:
            n = int(round(static_fraction * H))
            s = sorted(torch.argsort(scores[li], descending=True)[:n].tolist())
        static.append(s)
        dynamic.append([h for h in range(H) if h not in s])
    return HeadSplit(L, H, static, dynamic)


@torch.no_grad()
def profile_heads(pipe, prompt_embeds_list: list[torch.Tensor], num_frames: int, height: int | None = None, width: int | None = None,
                  profile_chunk: int | None = None, sigmas: tuple = (0.0, 0.5), last_k: int | None = None, skip_first: int = 1,
                  threshold: float = 0.8, static_fraction: float | None = None, seed: int = 0,
                  out_path: str | os.PathLike | None = None,
                  context_list: list[torch.Tensor] | None = None) -> tuple[HeadSplit, torch.Tensor]:
    """Profile ``pipe``'s heads; returns (split, scores [L, H]) and writes the head file if asked.
    ``context_list``: per prompt, given first frames (``context_frames`` of the pipeline) or None."""
    C = pipe.config.chunk_frames
    height, width = height or pipe.config.height, width or pipe.config.width
    T = pipe.tokens_per_frame(height, width)
    n_chunks = num_frames // C
    pc = n_chunks - 1 if profile_chunk is None else profile_chunk
    if not 1 <= pc < n_chunks:
        raise ValueError(f"profile_chunk must be in [1, {n_chunks}) so there is history to attend to, got {pc}")
    last_k = C + 1 if last_k is None else last_k
    nf = (pc + 1) * C
    if not 1 <= last_k < nf - skip_first:
        raise ValueError(f"last_k={last_k} and skip_first={skip_first} leave no earlier frames among {nf}")
    total = torch.zeros(pipe.num_layers, pipe.num_heads, nf)
    count = 0
    saved_policy = pipe._policy
    pipe._policy = pipe._default_policy
    try:
        for i, emb in enumerate(prompt_embeds_list):
            emb = emb.to(pipe.device, pipe.dtype)
            given = None if context_list is None else context_list[i]
            video = pipe(emb, num_frames=num_frames, height=height, width=width, seed=seed + i, decode=False,
                         context_frames=given).latents[:, :, :nf]
            g = torch.Generator().manual_seed(seed + 1000 + i)
            for s in sigmas:
                x = video.clone()
                eps = torch.randn(x[:, :, -C:].shape, generator=g).to(x)
                x[:, :, -C:] = (1 - s) * x[:, :, -C:] + s * eps
                fs = torch.zeros(x.shape[0], nf)
                fs[:, -C:] = s
                rec = {}
                pipe.ctx.recorder = lambda layer, q, k, bias: rec.__setitem__(layer, frame_attention_mass(q, k, T, slice((nf - C) * T, nf * T), bias))
                try:
                    pipe.forward_dense(x, fs, emb, frame_mask=block_causal_frame_mask(nf, C))
                finally:
                    pipe.ctx.recorder = None
                for layer, m in rec.items():
                    total[layer] += m.cpu()
                count += 1
    finally:
        pipe._policy = saved_policy
    mass = total / count
    scores = mass[:, :, -last_k:].sum(-1) / mass[:, :, skip_first:].sum(-1).clamp_min(1e-12)
    split = scores_to_split(scores, threshold, static_fraction)
    if out_path is not None:
        profile = f"last{last_k}_skip{skip_first}_" + (f"thr{threshold}" if static_fraction is None else f"rank{static_fraction}")
        save_head_file(split, out_path, profile=profile, scores=[[round(float(v), 4) for v in row] for row in scores],
                       num_prompts=len(prompt_embeds_list), num_frames=nf, sigmas=list(sigmas))
    return split, scores


def main(argv: list[str] | None = None) -> int:
    """``python -m dcache.pipelines.ar_video.profiler --model DIR`` writes DIR/forcingkv_heads.json."""
    import argparse

    from dcache.pipelines.ar_video.reference import load_reference, prompt_embeds, sample_prompts

    ap = argparse.ArgumentParser(description="Profile static/dynamic heads of the reference AR video model.")
    ap.add_argument("--model", required=True, help="reference model directory")
    ap.add_argument("--out", default=None, help="head file (default: MODEL/forcingkv_heads.json)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--num-frames", type=int, default=12)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--static-fraction", type=float, default=None)
    ap.add_argument("--seed", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from dcache.pipelines.ar_video import occlusion

    contexts = None
    if occlusion.model_world(args.model) == "occlusion":  # first chunk given from ground-truth clips (training digits)
        pipe = occlusion.load_occlusion(args.model)
        lat, prompts, _ = occlusion.make_batch(args.prompts, args.num_frames, torch.Generator().manual_seed(args.seed))
        embs = [occlusion.prompt_embeds([p]) for p in prompts]
        contexts = [lat[i : i + 1, :, : pipe.config.chunk_frames] for i in range(args.prompts)]
    else:
        pipe = load_reference(args.model)
        embs = [prompt_embeds([p]) for p in sample_prompts(args.prompts, args.seed)]
    out = args.out or os.path.join(args.model, "forcingkv_heads.json")
    split, scores = profile_heads(pipe, embs, args.num_frames, threshold=args.threshold, static_fraction=args.static_fraction,
                                  seed=args.seed, out_path=out, context_list=contexts)
    for li in range(split.num_layers):
        print(f"layer {li}: scores {[round(float(s), 3) for s in scores[li]]} static {split.static[li]} dynamic {split.dynamic[li]}")
    print(f"static {split.counts()[0]} / dynamic {split.counts()[1]} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
