"""Train the scenes model (rectified flow, text-conditional, classifier-free guidance).

Usage (the shipped run; see scenes_model.json's "training" entry for the exact arguments)::

    OMP_NUM_THREADS=1 nice -n 10 python -m dcache.pipelines.zoo.scenes.train --out /tmp/scenes_run \\
        --steps 7000 --minutes 60

Continuing a run: ``--init DIR`` starts from the weights in DIR (e.g. the shipped package folder)
with a fresh warm-up and cosine; the shipped model was trained this way in two legs (train.log).

Scenes are drawn on the fly (no dataset). Writes ``scenes_model.json``,
``scenes_transformer.safetensors`` and ``scenes_text_encoder.safetensors`` (EMA weights, float16)
into ``--out`` every ``--save-every`` steps and at the end; every ``--eval-every`` steps it samples
``--eval-samples`` prompts and logs the checker's whole-prompt adherence.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .grammar import VOCABULARY
from .model import (
    CONFIG_FILE,
    TEXT_ENCODER_FILE,
    TRANSFORMER_FILE,
    SceneTokenizer,
    ScenesModelConfig,
    build_text_encoder,
    build_transformer,
    config_of,
    image_ids,
    pack,
)
from .render import sample_batch


def save_checkpoint(out: Path, cfg: ScenesModelConfig, transformer, text_encoder, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # float16 halves the package size; loading casts back to the requested dtype.
    half = lambda m: {k: v.detach().to(torch.float16).contiguous() for k, v in m.state_dict().items()}
    save_file(half(transformer), str(out / TRANSFORMER_FILE))
    save_file(half(text_encoder), str(out / TEXT_ENCODER_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(
        {"model": asdict(cfg), "vocabulary": list(VOCABULARY), "training": meta}, indent=2))


def evaluate(transformer, text_encoder, cfg: ScenesModelConfig, n: int, steps: int, guidance: float) -> float:
    from .checker import adherence_rate, check_adherence
    from .grammar import sample_prompts
    from .pipeline import FluxScenesPipeline
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = FluxScenesPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                              text_encoder=text_encoder, image_size=cfg.image_size, patch=cfg.patch,
                              text_layout=cfg.text_layout)
    pipe.set_progress_bar_config(disable=True)
    prompts = sample_prompts(n, seed=12345)
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    return adherence_rate(check_adherence(images, prompts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=7000, help="length of the learning-rate schedule")
    p.add_argument("--minutes", type=float, default=None, help="stop (and save) after this much wall time")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--prompt-drop", type=float, default=0.1, help="probability of the empty prompt (for CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--init", type=Path, default=None,
                   help="start from the weights in this folder (a --out folder or the shipped package "
                        "folder) with a fresh learning-rate schedule; the model config is read from it")
    p.add_argument("--text-layout", choices=("sequence", "slots"), default="slots",
                   help="how prompts become text tokens (SceneTokenizer); with --init this may change the "
                        "layout the weights were trained on (the text encoder's shapes are the same)")
    p.add_argument("--keep-evals", action="store_true",
                   help="also keep a checkpoint per eval under OUT/step_N, to ship the best one")
    args = p.parse_args(argv)
    if args.steps <= 0 or args.batch_size <= 0:
        raise SystemExit("error: --steps and --batch-size must be positive")
    if args.init is not None:
        missing = [n for n in (CONFIG_FILE, TRANSFORMER_FILE, TEXT_ENCODER_FILE) if not (args.init / n).is_file()]
        if missing:
            raise SystemExit(f"error: --init {args.init} lacks {', '.join(missing)}; pass a folder written by --out")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    init_meta = None
    if args.init is not None:
        init_meta = json.loads((args.init / CONFIG_FILE).read_text())
        if tuple(init_meta.get("vocabulary", ())) != VOCABULARY:
            raise SystemExit(f"error: {args.init} was trained on another vocabulary than {VOCABULARY}")
        cfg = replace(config_of(init_meta), text_layout=args.text_layout)
    else:
        cfg = ScenesModelConfig(text_layout=args.text_layout)
    tok = SceneTokenizer(cfg.text_layout, cfg.patch)
    transformer, text_encoder = build_transformer(cfg).train(), build_text_encoder(cfg, tok).train()
    if args.init is not None:
        # The shipped weights are the EMA weights in float16; training continues from them in float32.
        transformer.load_state_dict({k: v.float() for k, v in load_file(str(args.init / TRANSFORMER_FILE)).items()})
        text_encoder.load_state_dict({k: v.float() for k, v in load_file(str(args.init / TEXT_ENCODER_FILE)).items()})
    ema_t, ema_e = copy.deepcopy(transformer).eval(), copy.deepcopy(text_encoder).eval()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        if args.minutes is not None:
            # On a shared machine the step rate varies: the cosine follows whichever of steps and
            # wall time runs out first, so a run cut by --minutes still ends at the low rate.
            frac = max(frac, (time.time() - t_start) / (args.minutes * 60))
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    img_ids = image_ids(cfg.image_size, cfg.image_size, cfg.patch)
    txt_ids = tok.positions()
    n_params = sum(q.numel() for q in transformer.parameters())
    n_text = sum(q.numel() for q in text_encoder.parameters())
    print(f"transformer params {n_params/1e6:.2f}M, text encoder {n_text/1e6:.3f}M, {vars(args)}", flush=True)
    t_start, running, evals = time.time(), None, []
    done = 0
    for step in range(args.steps):
        images, prompts = sample_batch(args.batch_size, rng)
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2) * 2.0 - 1.0  # model space is [-1, 1]
        ids = tok(prompts)
        drop = torch.rand(args.batch_size, generator=gen) < args.prompt_drop
        ids[drop] = tok.null(int(drop.sum()))
        noise = torch.randn(x0.shape, generator=gen)
        # logit-normal times put more training on the middle of the path (SD3, arXiv 2403.03206).
        t = torch.sigmoid(torch.randn(args.batch_size, generator=gen))
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        enc, pooled = text_encoder(ids)
        pred = transformer(
            hidden_states=pack(xt, cfg.patch), encoder_hidden_states=enc, pooled_projections=pooled, timestep=t,
            img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
        )[0]
        loss = (pred - pack(noise - x0, cfg.patch)).pow(2).mean()
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((transformer, ema_t), (text_encoder, ema_e)):
                for ps, pd in zip(src.parameters(), dst.parameters()):
                    pd.lerp_(ps, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        done = step + 1
        elapsed = time.time() - t_start
        out_of_time = args.minutes is not None and elapsed > args.minutes * 60
        last = done == args.steps or out_of_time
        if done % args.log_every == 0 or last:
            print(f"step {done}/{args.steps} loss {loss.item():.4f} ema_loss {running:.4f} "
                  f"lr {lr:.2e} {done/elapsed:.2f} it/s elapsed {elapsed/60:.1f} min", flush=True)
        if done % args.eval_every == 0 or last:
            rate = evaluate(ema_t, ema_e, cfg, args.eval_samples, args.eval_steps, args.guidance)
            evals.append({"step": done, "adherence": rate})
            print(f"eval step {done}: whole-prompt adherence {rate:.3f} on {args.eval_samples} prompts, "
                  f"{args.eval_steps} steps, guidance {args.guidance}", flush=True)
        if done % args.save_every == 0 or last:
            meta = dict(vars(args), out=str(args.out), init=None if args.init is None else str(args.init),
                        init_training=None if init_meta is None else init_meta.get("training"),
                        steps_done=done, ema_loss=running,
                        minutes=(time.time() - t_start) / 60, transformer_params=n_params,
                        text_encoder_params=n_text, evals=evals)
            save_checkpoint(args.out, cfg, ema_t, ema_e, meta)
            if args.keep_evals and (done % args.eval_every == 0 or last):
                save_checkpoint(args.out / f"step_{done}", cfg, ema_t, ema_e, meta)
        if out_of_time:
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
