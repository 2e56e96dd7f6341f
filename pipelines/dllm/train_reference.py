"""Train the reference masked diffusion LM (LLaDA architecture) on the keyed digit cipher.

Objective: LLaDA's SFT loss. The prompt is never masked; each answer token is masked with
probability t ~ U(eps, 1); cross-entropy on masked tokens is divided by t and averaged over the
answer tokens (LLaDA GUIDELINES.md, eps = 1e-3).

Run (about 35-50 min on one CPU thread)::

    nice -n 10 python -m dcache.pipelines.dllm.train_reference --out pipelines/zoo/dllm_cipher \
        --minutes 45 > train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from dcache.pipelines.dllm.config import LLaDAConfig
from dcache.pipelines.dllm.modeling import LLaDAModelLM
from dcache.pipelines.dllm import tasks
from dcache.pipelines.dllm.generate import llada_generate  # eager: a long run must not pick up later edits

REFERENCE_CONFIG = dict(d_model=96, n_heads=4, n_layers=3, mlp_hidden_size=256, vocab_size=tasks.VOCAB,
                        max_sequence_length=512, rope_theta=10000.0, mask_token_id=tasks.MASK,
                        eos_token_id=tasks.EOS, pad_token_id=tasks.EOS)


def batch(bs: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
    # Mostly full 128-slot canvases; sometimes shorter ones so that gen_length 64 is in distribution.
    gen = 128 if torch.rand((), generator=g) < 0.7 else int(torch.randint(32, 128, (), generator=g))
    prompts, ans = tasks.make_problems(bs, gen_length=gen, n_range=(1, gen), generator=g,
                                         key_zero_frac=0.3)
    return torch.cat([prompts, ans], 1), prompts.shape[1]


def loss_fn(model: LLaDAModelLM, x: torch.Tensor, plen: int, g: torch.Generator) -> torch.Tensor:
    B, L = x.shape
    eps = 1e-3
    t = torch.rand(B, 1, generator=g) * (1 - eps) + eps
    masked = torch.rand(B, L, generator=g) < t
    masked[:, :plen] = False
    noisy = torch.where(masked, torch.full_like(x, tasks.MASK), x)
    logits = model(noisy).logits
    ce = F.cross_entropy(logits[masked], x[masked], reduction="none")
    return (ce / t.expand(B, L)[masked]).sum() / (B * (L - plen))


@torch.no_grad()
def evaluate(model: LLaDAModelLM, count: int = 64, gen_length: int = 128) -> float:
    model.eval()
    prompts, ans = tasks.make_problems(count, gen_length=gen_length, n_range=(gen_length * 3 // 4, gen_length),
                                       seed=12345)
    out = llada_generate(model, prompts, gen_length=gen_length, block_length=32, steps=gen_length // 2)
    model.train()
    return tasks.exact_match(out.sequences, ans)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="pipelines/zoo/dllm_cipher")
    ap.add_argument("--minutes", type=float, default=45.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    model = LLaDAModelLM(LLaDAConfig(**REFERENCE_CONFIG))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f} M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    budget = args.minutes * 60
    t0 = time.time()
    step, ema, best = 0, None, -1.0
    history = []
    while True:
        el = time.time() - t0
        if el > budget:
            break
        frac = el / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        x, plen = batch(args.batch, g)
        loss = loss_fn(model, x, plen, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0:
            print(f"step {step} t {el / 60:.1f}m loss {ema:.4f} lr {lr:.2e}", flush=True)
        if step % args.eval_every == 0:
            acc = evaluate(model, count=32)
            history.append({"step": step, "minutes": round(el / 60, 2), "loss": round(ema, 4), "acc": acc})
            print(f"eval step {step} exact-match {acc:.3f}", flush=True)
            if acc >= best:
                best = acc
                model.save_pretrained(args.out)
    acc = evaluate(model, count=64)
    history.append({"step": step, "minutes": round((time.time() - t0) / 60, 2), "loss": round(ema, 4), "acc": acc})
    print(f"final step {step} exact-match {acc:.3f}", flush=True)
    if acc >= best:
        model.save_pretrained(args.out)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"config": REFERENCE_CONFIG, "args": vars(args), "params": n_params, "history": history}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
