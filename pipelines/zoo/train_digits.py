"""Train the reference digits model (rectified flow, class-conditional, classifier-free guidance).

Usage::

    nice -n 10 python -m dcache.pipelines.zoo.train_digits --out /tmp/digits_run --steps 1000

Writes ``digits_model.json``, ``digits_transformer.safetensors`` and
``digits_class_embedder.safetensors`` (EMA weights, float16) into ``--out``, every
``--save-every`` steps and at the end, so a run cut short still leaves a usable checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from .digits_model import (
    CONFIG_FILE,
    EMBEDDER_FILE,
    TRANSFORMER_FILE,
    DigitsModelConfig,
    build_embedder,
    build_transformer,
    image_ids,
    load_digit_images,
    pack,
    text_ids,
)


def save_checkpoint(out: Path, cfg: DigitsModelConfig, transformer, embedder, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # float16 halves the package size; sampling casts back to the requested dtype.
    half = lambda m: {k: v.detach().to(torch.float16).contiguous() for k, v in m.state_dict().items()}
    save_file(half(transformer), str(out / TRANSFORMER_FILE))
    save_file(half(embedder), str(out / EMBEDDER_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"model": asdict(cfg), "training": meta}, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--label-drop", type=float, default=0.1, help="probability of the null label (for CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--stop-after", type=int, default=None,
                   help="end after this many steps of the --steps schedule (the shipped run: 800 of 1000)")
    args = p.parse_args(argv)
    if args.steps <= 0 or args.batch_size <= 0:
        raise ValueError("--steps and --batch-size must be positive")
    if args.stop_after is not None and args.stop_after <= 0:
        raise ValueError("--stop-after must be positive")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = DigitsModelConfig()
    images, labels = load_digit_images(cfg.image_size, split="train")
    data = images * 2.0 - 1.0  # model space is [-1, 1]

    transformer, embedder = build_transformer(cfg).train(), build_embedder(cfg).train()
    ema_t, ema_e = copy.deepcopy(transformer).eval(), copy.deepcopy(embedder).eval()
    params = list(transformer.parameters()) + list(embedder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    img_ids = image_ids(cfg.image_size, cfg.image_size)
    txt_ids = text_ids(cfg.num_text_tokens)
    n_params = sum(p.numel() for p in transformer.parameters())
    print(f"transformer params {n_params/1e6:.2f}M, data {tuple(data.shape)}", flush=True)
    t_start, running = time.time(), None
    last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    for step in range(last):
        idx = torch.randint(0, data.shape[0], (args.batch_size,), generator=gen)
        x0, y = data[idx], labels[idx].clone()
        y[torch.rand(args.batch_size, generator=gen) < args.label_drop] = cfg.num_classes
        noise = torch.randn(x0.shape, generator=gen)
        # logit-normal times put more training on the middle of the path (SD3, arXiv 2403.03206).
        t = torch.sigmoid(torch.randn(args.batch_size, generator=gen))
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        enc, pooled = embedder(y)
        pred = transformer(
            hidden_states=pack(xt), encoder_hidden_states=enc, pooled_projections=pooled, timestep=t,
            img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
        )[0]
        loss = (pred - pack(noise - x0)).pow(2).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((transformer, ema_t), (embedder, ema_e)):
                for ps, pd in zip(src.parameters(), dst.parameters()):
                    pd.lerp_(ps, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        done = step + 1
        if done % args.log_every == 0 or done == last:
            el = time.time() - t_start
            print(f"step {done}/{args.steps} loss {loss.item():.4f} ema_loss {running:.4f} "
                  f"lr {lr_at(step):.2e} {done/el:.2f} it/s elapsed {el/60:.1f} min", flush=True)
        if done % args.save_every == 0 or done == last:
            meta = dict(vars(args), out=str(args.out), steps_done=done, ema_loss=running,
                        minutes=(time.time() - t_start) / 60, transformer_params=n_params)
            save_checkpoint(args.out, cfg, ema_t, ema_e, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
