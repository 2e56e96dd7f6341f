"""Train the reference causal video model (moving digits) with teacher forcing.

Each training clip is run as one 2x sequence (clean copy at t=0 + noisy copy, one noise level per
chunk) with the teacher-forcing mask: clean frames attend block-causally to clean frames, noisy
frames attend to the clean frames of earlier chunks and to their own noisy chunk. This is exactly
what the cached inference loop computes (clean commit pass + noisy denoise passes), so the trained
model runs unchanged in :class:`~dcache.pipelines.ar_video.pipeline.ARVideoPipeline`. Loss: flow
matching (v = noise - x0) on the noisy copy; half of the noise levels are the sampler's four sigmas.

Options shape the history the model learns from: gapped sequences put a clip at the absolute
positions of a long video, history windows cut the clean context to sink + newest frames (what
``kv-rolling`` shows), context corruption blurs/noises it (exposure bias), ``--recency`` plants
per-head recency slopes. The shipped model's three stages are listed in ``docs/ar_video.md``.

Usage (stage 3 of the shipped model)::

    python -m dcache.pipelines.ar_video.train_reference --init STAGE2_DIR --out DIR --frames 21 --lr 5e-4 \
        --threads 2 --window-prob 0.3 --corrupt-prob 0.5 --recency "3,3,3,3;3,1,3,1;1,3,3,1;3,1,1,3" --minutes 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from dcache.pipelines.ar_video.pipeline import ARVideoConfig, ARVideoPipeline, sigmas_for
from dcache.pipelines.ar_video import occlusion, reference
from dcache.pipelines.ar_video.reference import LATENT, build_transformer

WORLDS = {"digits": reference, "occlusion": occlusion}
# frames given (not generated) at the start of every clip, per world: they are context, not targets
GIVEN_FRAMES = {"digits": 0, "occlusion": occlusion.CONTEXT_FRAMES}


def history_window_mask(base: torch.Tensor, num_frames: int, chunk: int, windows: torch.Tensor, sink_frames: int = 1) -> torch.Tensor:
    """Per-sample [B, 2F, 2F] mask: ``base`` with each row's view of the *clean* copy cut to the sink
    frames, the newest ``windows[b]`` frames before the row's chunk, and the row's own chunk
    (``windows[b] <= 0``: no cut). This is what a rolling / Forcing-KV-style cache shows the model."""
    rows = torch.arange(2 * num_frames) % num_frames
    start = (rows // chunk) * chunk  # first frame of each row's chunk
    cols = torch.arange(2 * num_frames)
    clean_col = cols < num_frames
    w = windows.clamp_min(0)[:, None, None]
    keep = (cols[None, None, :] >= start[None, :, None] - w) | (cols[None, None, :] < sink_frames) | ~clean_col[None, None, :]
    keep = keep | (windows <= 0)[:, None, None]
    return base[None] & keep


def gapped_frames(num_frames: int, chunk: int, first_chunk: int) -> torch.Tensor:
    """Frame indices of a training sequence: chunk 0 (holds the sink), then ``num_frames - chunk``
    contiguous frames starting at chunk ``first_chunk`` (1 = an ordinary contiguous clip). A gap
    puts the window at the absolute RoPE positions of a long video."""
    return torch.cat([torch.arange(chunk), torch.arange(first_chunk * chunk, first_chunk * chunk + num_frames - chunk)])


def corrupt_context(x0: torch.Tensor, generator: torch.Generator, prob: float, max_blur: float = 1.0, max_noise: float = 0.1) -> torch.Tensor:
    """Degrade the clean context copy the way the model's own outputs are degraded (blur, noise).

    Teacher forcing shows the model perfect context, but at generation time it reads its own
    blurry chunks; the gap makes small differences grow chunk after chunk (exposure bias). Training
    the noisy copy to predict the *true* frames from degraded context teaches the model to pull a
    drifting rollout back, so two rollouts that differ slightly (e.g. full vs compressed cache)
    converge instead of diverging. A ``prob`` share of the clips gets a per-frame random blend
    with a 3x3 blur (weight up to ``max_blur``) plus Gaussian noise (std up to ``max_noise``),
    in pixel space; latents are the 2x space-to-depth of pixels in [-1, 1]."""
    B, Ch, nf, h, w = x0.shape
    r = int(round(Ch**0.5))
    px = F.pixel_shuffle(x0.transpose(1, 2).reshape(B * nf, Ch, h, w), r)  # [B*F, 1, H, W]
    blur = F.avg_pool2d(F.pad(px, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    on = (torch.rand(B, 1, generator=generator) < prob).float()
    a = (torch.rand(B, nf, generator=generator) * max_blur * on).reshape(B * nf, 1, 1, 1)
    n = (torch.rand(B, nf, generator=generator) * max_noise * on).reshape(B * nf, 1, 1, 1)
    px = (1 - a) * px + a * blur + n * 2 * torch.randn(px.shape, generator=generator)
    lat = F.pixel_unshuffle(px, r).reshape(B, nf, Ch, h, w).transpose(1, 2)
    return lat.contiguous()


def teacher_forcing_mask(num_frames: int, chunk: int) -> torch.Tensor:
    """[2F, 2F] frame mask for (clean copy, noisy copy)."""
    c = torch.arange(num_frames) // chunk
    same_or_before = c[None, :] <= c[:, None]
    before = c[None, :] < c[:, None]
    same = c[None, :] == c[:, None]
    top = torch.cat([same_or_before, torch.zeros_like(same)], 1)
    bottom = torch.cat([before, same], 1)
    return torch.cat([top, bottom], 0)


@torch.no_grad()
def evaluate(pipe: ARVideoPipeline, clips: int = 16, frames: int = 12, seed: int = 999, world: str = "digits") -> dict:
    """Held-out digits, teacher-forced: PSNR (pixels in [0, 1]) of the one-call x0 prediction of every
    chunk after the first, per sampler sigma, against a copy-the-last-frame baseline."""
    cfg = pipe.config
    C = cfg.chunk_frames
    gen = torch.Generator().manual_seed(seed)
    x0, prompts, px = WORLDS[world].make_batch(clips, frames, gen, digit_pool="test")
    emb = WORLDS[world].prompt_embeds(prompts)
    mask = teacher_forcing_mask(frames, C)
    pos = torch.arange(frames)
    res = {}

    def psnr(a, b):
        return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))

    for s in sigmas_for(cfg.denoising_steps, cfg.shift):
        eps = torch.randn(x0.shape, generator=gen)
        xt = (1 - s) * x0 + s * eps
        sig = torch.cat([torch.zeros(clips, frames), torch.full((clips, frames), s)], 1)
        v = pipe.forward_dense(torch.cat([x0, xt], 2), sig, emb, frame_positions=torch.cat([pos, pos]), frame_mask=mask)[:, :, frames:]
        pred = pipe.decode(xt - s * v).clamp(0, 1)
        res[f"x0_psnr_sigma{s:.3f}"] = round(psnr(pred[:, :, C:], px[:, :, C:]), 2)
    last = torch.cat([px[:, :, c * C - 1 : c * C].expand(-1, -1, C, -1, -1) for c in range(1, frames // C)], 2)
    res["copy_last_frame_psnr"] = round(psnr(last, px[:, :, C:]), 2)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--world", choices=sorted(WORLDS), default="digits",
                    help="digits: moving digits (prompt = digit, velocity); occlusion: a still digit behind a moving bar, "
                         "first chunk given (see dcache.pipelines.ar_video.occlusion)")
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--max-position", type=int, default=100, help="largest absolute frame index a gapped sequence reaches")
    ap.add_argument("--contiguous-prob", type=float, default=0.4, help="share of sequences without a gap after chunk 0")
    ap.add_argument("--window-prob", type=float, default=0.6, help="share of sequences whose history is cut to sink + window")
    ap.add_argument("--max-window", type=int, default=6, help="windows are drawn from 1..max-window frames")
    ap.add_argument("--corrupt-prob", type=float, default=0.5, help="share of clips whose clean context is blurred / noised")
    ap.add_argument("--consistency", type=float, default=0.0,
                    help="> 0: also run every clip with its whole history and add this weight times the squared gap "
                         "between the windowed and the full-history prediction (all clips are windowed then)")
    ap.add_argument("--recency", default=None,
                    help="plant head roles with a recency bias: per-layer slopes 'h0,h1,..;h0,h1,..' (one group per layer), "
                         "see dcache.pipelines.ar_video.attention.RecencyBias")
    ap.add_argument("--init", default=None, help="start from this model directory instead of random weights")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-only", action="store_true", help="evaluate the model in --out and print the numbers")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.eval_only:
        from dcache.pipelines.ar_video.reference import load_reference

        pipe = load_reference(args.out)
        print(json.dumps(evaluate(pipe, frames=max(12, args.frames), world=args.world), indent=1))
        return 0
    cfg = ARVideoConfig(chunk_frames=3, pixel_shuffle=2, height=LATENT, width=LATENT)
    if args.init:
        from diffusers import WanTransformer3DModel

        pipe = ARVideoPipeline(WanTransformer3DModel.from_pretrained(args.init), cfg)
    else:
        pipe = ARVideoPipeline(build_transformer(args.seed), cfg)
    if args.recency:
        from dcache.pipelines.ar_video.attention import RecencyBias

        slopes = [[float(x) for x in grp.split(",")] for grp in args.recency.split(";")]
        pipe.ctx.recency = RecencyBias(slopes, sink_frames=1)
    model = pipe.transformer.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    Fr, C = args.frames, cfg.chunk_frames
    mask = teacher_forcing_mask(Fr, C)
    infer_sig = torch.tensor(sigmas_for(cfg.denoising_steps, cfg.shift))
    world = WORLDS[args.world]
    t_start, step, ema = time.time(), 0, None
    budget = args.minutes * 60
    log = open(os.path.join(args.out, "train_log.txt") if os.path.isdir(args.out) else os.devnull, "a")
    while step < args.max_steps and time.time() - t_start < budget:
        frac = (time.time() - t_start) / budget
        for gp in opt.param_groups:
            gp["lr"] = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        if float(torch.rand((), generator=gen)) < args.contiguous_prob:
            first = 1
        else:
            first = int(torch.randint(2, max(3, (args.max_position - Fr + 2 * C) // C), (1,), generator=gen))
        idx = gapped_frames(Fr, C, first)
        x0, prompts, _ = world.make_batch(args.batch, int(idx[-1]) + 1, gen)
        x0 = x0[:, :, idx].contiguous()
        emb = world.prompt_embeds(prompts)
        B = x0.shape[0]
        n_chunks = Fr // C
        u = torch.rand(B, n_chunks, generator=gen)
        shifted = cfg.shift * u / (1 + (cfg.shift - 1) * u)
        pick = infer_sig[torch.randint(0, len(infer_sig), (B, n_chunks), generator=gen)]
        sig_chunk = torch.where(torch.rand(B, n_chunks, generator=gen) < 0.5, pick, shifted)
        sig = sig_chunk.repeat_interleave(C, 1)  # [B, F]
        eps = torch.randn(x0.shape, generator=gen)
        s5 = sig[:, None, :, None, None]
        xt = (1 - s5) * x0 + s5 * eps
        pos = idx
        win = torch.randint(1, args.max_window + 1, (B,), generator=gen)
        if args.consistency <= 0:
            win = torch.where(torch.rand(B, generator=gen) < args.window_prob, win, torch.zeros_like(win))
        bmask = history_window_mask(mask, Fr, C, win)
        ctx_in = corrupt_context(x0, gen, args.corrupt_prob) if args.corrupt_prob > 0 else x0
        inp = torch.cat([ctx_in, xt], 2)
        frame_sig = torch.cat([torch.zeros(B, Fr), sig], 1)
        v = pipe.forward_dense(inp, frame_sig, emb, frame_positions=torch.cat([pos, pos]), frame_mask=bmask)[:, :, Fr:]
        # after a gap the first chunk has no recent frames to go on: it is context, not a target
        lw = torch.ones(Fr)
        lw[: GIVEN_FRAMES[args.world]] = 0
        if first > 1:
            lw[C : 2 * C] = 0

        def weighted(err):
            return ((err**2).mean(dim=(1, 3, 4)) * lw).sum() / (B * lw.sum())

        loss = weighted(v - (eps - x0))
        if args.consistency > 0:
            # the same clips with the whole history: both fit the data, and the windowed prediction
            # is pulled toward the full-history one (distilling long context into sink + window)
            v_full = pipe.forward_dense(inp, frame_sig, emb, frame_positions=torch.cat([pos, pos]), frame_mask=mask)[:, :, Fr:]
            loss = 0.5 * (loss + weighted(v_full - (eps - x0))) + args.consistency * weighted(v - v_full.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 20 == 0:
            msg = f"step {step} loss {loss.item():.4f} ema {ema:.4f} elapsed {time.time() - t_start:.0f}s"
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()
        if step % 200 == 0:
            model.eval()
            pipe.save_pretrained(args.out)
            model.train()
    model.eval()
    pipe.save_pretrained(args.out)
    with open(os.path.join(args.out, "world.json"), "w") as f:  # tells the bench how to build its samples
        json.dump({"world": args.world}, f)
    with open(os.path.join(args.out, "train_meta.json"), "w") as f:
        json.dump({"world": args.world, "steps": step, "batch": args.batch, "frames": args.frames, "max_position": args.max_position,
                   "contiguous_prob": args.contiguous_prob, "window_prob": args.window_prob, "max_window": args.max_window,
                   "init": args.init, "lr": args.lr, "corrupt_prob": args.corrupt_prob, "consistency": args.consistency, "recency": args.recency,
                   "final_loss_ema": ema, "minutes": (time.time() - t_start) / 60, "threads": args.threads, "seed": args.seed}, f, indent=1)
    print(f"done: {step} steps, loss ema {ema:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
