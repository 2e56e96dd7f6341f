"""Samplers for masked diffusion LMs: LLaDA's semi-autoregressive block sampler and Dream's schedule.

Both run one loop: the canvas ``[left-padded prompt ; MASK × gen_length]`` is split into blocks;
each step predicts the masked tokens of the current block and commits some of them. What differs:

* LLaDA: a fixed number of tokens per step (``gen_length/steps`` spread evenly over each block),
  chosen by confidence (``low_confidence``: softmax probability of the argmax token) or at random
  (``random``: a uniformly random order drawn once per block); temperature via Gumbel-max in
  float64 (LLaDA's ``add_gumbel_noise``).
* Dream: logits shifted right by one (position i is predicted at i-1), the count per step follows
  Dream's timesteps ``linspace(1, eps, steps+1)`` (``n_mask·(1-s/t)``, all at the last step),
  confidence per ``alg`` (``maskgit_plus``, ``topk_margin``, ``entropy``, ``origin``), sampling with
  temperature / top-p / top-k. Counts are per row here (Dream averages them over the batch).

A KV policy installed with ``dcache.accelerate`` (or passed as ``policy=``) decides per step what
is recomputed; without one every step is a full forward. Policies with a ``threshold`` switch the
count rule to Fast-dLLM's confidence-threshold parallel decoding.

Example::

    out = llada_generate(model, [[5, 6, 7], [8, 9]], gen_length=64, block_length=32, steps=64)
    out.sequences   # (2, 64) generated tokens
    out.nfe         # forwards run
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from dcache.pipelines.dllm.modeling import position_ids_from_mask
from dcache.pipelines.dllm.runtime import CachedForward
from dcache.schedulers._dllm_plan import StepContext

__all__ = ["GenerationOutput", "llada_generate", "dream_generate", "pad_prompts"]


@dataclass
class GenerationOutput:
    sequences: torch.Tensor      # (B, gen_length) generated tokens
    canvas: torch.Tensor         # (B, P + gen_length) left-padded prompt + generation
    attention_mask: torch.Tensor  # (B, P + gen_length)
    nfe: int
    steps: int


def pad_prompts(prompts: Any, pad_id: int, attention_mask: torch.Tensor | None = None,
                device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a list of token lists (or pass a (B, P) tensor through) → ids, attention mask."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompt tensor must be (B, P), got shape {tuple(prompts.shape)}")
        am = torch.ones_like(prompts, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if am.shape != prompts.shape:
            raise ValueError("attention_mask must have the prompt tensor's shape")
        return prompts.to(device), am.to(device)
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, Sequence) and len(p) for p in prompts):
        raise ValueError("prompts must be a (B, P) tensor or a non-empty list of non-empty token-id lists")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    am = torch.zeros((len(prompts), P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        am[i, P - len(p):] = True
    return ids.to(device), am.to(device)


def _gumbel_argmax(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    # LLaDA's float64 Gumbel-max: exp(l) / (-log u)^T has the same argmax as (l + T·gumbel) / T
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=gen).clamp_min(1e-300)
    return (logits.double().exp() / (-torch.log(u)) ** temperature).argmax(-1)


def _dream_sample(logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None,
                  alg: str, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        sl, si = torch.sort(logits, descending=True, dim=-1)
        cum = sl.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, si, drop), float("-inf"))
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if temperature > 0:
        flat = probs.reshape(-1, probs.shape[-1])
        x0 = torch.multinomial(flat, 1, generator=gen).view(probs.shape[:-1])
    else:
        x0 = probs.argmax(-1)
    conf = probs.gather(-1, x0[..., None])[..., 0]
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    elif alg == "entropy":
        conf = (probs * probs.clamp_min(1e-10).log()).sum(-1)
    return x0, conf


def _counts_even(n_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,) masked counts → (B, steps) tokens per step: floor share, remainder to the first steps."""
    base = n_mask // steps
    rem = n_mask % steps
    out = base[:, None].expand(-1, steps).clone()
    out += (torch.arange(steps, device=n_mask.device)[None] < rem[:, None]).long()
    return out


def _run(model: Any, prompts: Any, attention_mask: torch.Tensor | None, gen_length: int, block_length: int,
         steps: int, family: str, sample: Callable, count_rule: Callable, remasking: str,
         threshold: float | None, policy: Any, callback: Callable | None,
         generator: torch.Generator | None, window_length: int | None = None) -> GenerationOutput:
    for name, val in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if window_length is not None:
        if not isinstance(window_length, int) or window_length <= 0:
            raise ValueError(f"window_length must be None or a positive int, got {window_length!r}")
        if block_length != gen_length:
            raise ValueError(f"a sliding window (window_length={window_length}) replaces blocks: pass "
                             f"block_length=gen_length ({gen_length}), got {block_length}")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    n_blocks = gen_length // block_length
    if steps % n_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks ({n_blocks})")
    spb = steps // n_blocks
    cfg = model.config
    mask_id = cfg.mask_token_id
    dev = model.device
    ids, pam = pad_prompts(prompts, cfg.pad_token_id, attention_mask, dev)
    B, P = ids.shape
    L = P + gen_length
    max_len = getattr(cfg, "max_sequence_length", None) or getattr(cfg, "max_position_embeddings", None)
    if max_len is not None and L > max_len:
        raise ValueError(f"prompt ({P}) + gen_length ({gen_length}) = {L} tokens exceeds the model's context "
                         f"of {max_len}")
    x = torch.cat([ids, torch.full((B, gen_length), mask_id, dtype=torch.long, device=dev)], 1)
    am = torch.cat([pam, torch.ones(B, gen_length, dtype=torch.bool, device=dev)], 1)
    pos = position_ids_from_mask(am)
    if policy is None:
        policy = getattr(model, "_dcache_policy", None)
    if threshold is None and policy is not None:
        threshold = getattr(policy, "threshold", None)
    handle = model.__dict__.get("dcache") if policy is getattr(model, "_dcache_policy", None) else None
    fwd = CachedForward(model, policy, handle)
    decoded_prev = torch.zeros_like(am)
    total_steps = 0
    try:
        with torch.no_grad():
            for b in range(n_blocks):
                s, e = P + b * block_length, P + (b + 1) * block_length
                in_block = torch.zeros_like(am)
                in_block[:, s:e] = True
                n_mask = ((x == mask_id) & in_block).sum(1)
                plan_counts = _counts_even(n_mask, spb) if family == "llada" else None
                prio = None
                if remasking == "random":
                    prio = torch.rand(B, L, device=dev, generator=generator)
                i = 0
                while True:
                    masked = (x == mask_id) & in_block
                    if not bool(masked.any()):
                        break
                    if window_length is not None:
                        # Elastic-Cache's sliding window: only the first window_length masked slots
                        masked = masked & (masked.cumsum(1) <= window_length)
                    if threshold is None and i >= spb:
                        break
                    # how many to commit this step (fixed-count rules)
                    if family == "llada":
                        k = plan_counts[:, i] if i < spb else masked.sum(1)
                    else:
                        k = count_rule(masked.sum(1), i, spb)
                    decode_next = None
                    if prio is not None and threshold is None:
                        decode_next = _topk_mask(torch.where(masked, prio, torch.full_like(prio, -1.0)), k, masked)
                    ctx = StepContext(x=x, mask_id=mask_id, prompt_len=P, attention_mask=am, block=(s, e),
                                      step=total_steps, block_step=i, decode_next=decode_next,
                                      decoded_prev=decoded_prev, candidates=masked)
                    logits, idx = fwd(ctx, masked, pos)
                    if mask_id < logits.shape[-1]:
                        logits[..., mask_id] = float("-inf")  # committing MASK would never finish
                    x0_a, conf_a = sample(logits)
                    x0 = torch.full((B, L + 1), mask_id, dtype=torch.long, device=dev)
                    conf = torch.full((B, L + 1), float("-inf"), dtype=torch.float32, device=dev)
                    x0.scatter_(1, idx, x0_a)
                    conf.scatter_(1, idx, conf_a.float())
                    x0, conf = x0[:, :L], conf[:, :L]
                    conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
                    if decode_next is not None:
                        commit = decode_next
                    elif threshold is not None:
                        best = _topk_mask(conf, torch.ones_like(k), masked)
                        commit = ((conf >= threshold) & masked) | best
                    elif remasking == "origin":
                        p = count_rule.prob(i, spb)
                        commit = masked & (torch.rand(B, L, device=dev, generator=generator) < p)
                    else:
                        commit = _topk_mask(conf, k, masked)
                    x = torch.where(commit, x0, x)
                    decoded_prev = commit
                    i += 1
                    total_steps += 1
                    if callback is not None:
                        callback(total_steps, x[:, P:], commit[:, P:])
    finally:
        fwd.close()
    return GenerationOutput(sequences=x[:, P:], canvas=x, attention_mask=am, nfe=fwd.nfe, steps=total_steps)


def _topk_mask(score: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Per row, the k highest-scoring allowed slots (k may differ per row)."""
    kmax = int(k.max()) if k.numel() else 0
    out = torch.zeros_like(allowed)
    if kmax <= 0:
        return out
    s = torch.where(allowed, score, torch.full_like(score, float("-inf")))
    top = torch.topk(s, kmax, dim=1).indices
    take = torch.arange(kmax, device=score.device)[None] < k[:, None]
    out.scatter_(1, top, take)
    return out & allowed


def llada_generate(
    model: Any, input_ids: Any, attention_mask: torch.Tensor | None = None, *, gen_length: int = 128,
    block_length: int = 32, steps: int = 128, temperature: float = 0.0, remasking: str = "low_confidence",
    threshold: float | None = None, policy: Any = None, callback: Callable | None = None,
    generator: torch.Generator | None = None, window_length: int | None = None,
) -> GenerationOutput:
    """LLaDA's semi-autoregressive sampler. ``input_ids``: (B, P) tensor (+ ``attention_mask`` for left
    padding) or a list of token lists of any lengths. ``callback(step, tokens, committed)`` streams.
    ``window_length``: commit only among the first that many masked positions (Elastic-Cache's
    sliding window; needs ``block_length == gen_length``).

    Example::

        out = llada_generate(model, prompts, gen_length=256, block_length=32, steps=256)
    """
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")

    def sample(logits: torch.Tensor):
        x0 = _gumbel_argmax(logits, temperature, generator)
        conf = F.softmax(logits.float(), -1).gather(-1, x0[..., None])[..., 0]
        return x0, conf

    return _run(model, input_ids, attention_mask, gen_length, block_length, steps, "llada", sample, None,
                remasking, threshold, policy, callback, generator, window_length)


class _DreamCounts:
    def __init__(self, steps: int, eps: float) -> None:
        self.ts = torch.linspace(1, eps, steps + 1)

    def prob(self, i: int, spb: int) -> float:
        if i >= spb - 1:
            return 1.0
        t, s = self.ts[i].item(), self.ts[i + 1].item()
        return 1 - s / t

    def __call__(self, n_mask: torch.Tensor, i: int, spb: int) -> torch.Tensor:
        if i >= spb - 1:
            return n_mask
        return (n_mask.double() * self.prob(i, spb)).long()


def dream_generate(
    model: Any, input_ids: Any, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 128,
    steps: int = 128, block_length: int | None = None, temperature: float = 0.0, top_p: float | None = None,
    top_k: int | None = None, alg: str = "maskgit_plus", eps: float = 1e-3, threshold: float | None = None,
    policy: Any = None, callback: Callable | None = None, generator: torch.Generator | None = None,
    window_length: int | None = None,
) -> GenerationOutput:
    """Dream's sampler (``diffusion_generate``). ``block_length=None`` denoises the whole canvas at
    once as Dream does; a block length gives semi-AR blocks (needed by the prefix/dual caches).
    Defaults follow Dream's official ``generation_config.json`` (temperature 0, top_p and top_k
    None, eps 1e-3), except ``alg``: the official default ``origin`` unmasks in random order;
    ``maskgit_plus`` (confidence order) is deterministic and is what the caches are tested with.

    Example::

        out = dream_generate(model, prompts, max_new_tokens=256, steps=256, alg="entropy")
    """
    algs = ("origin", "maskgit_plus", "topk_margin", "entropy")
    if alg not in algs:
        raise ValueError(f"alg must be one of {algs}, got {alg!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    block_length = block_length or max_new_tokens
    n_blocks = max_new_tokens // block_length if max_new_tokens % block_length == 0 else 1
    counts = _DreamCounts(steps // max(n_blocks, 1), eps)

    def sample(logits: torch.Tensor):
        return _dream_sample(logits, temperature, top_p, top_k, alg, generator)

    return _run(model, input_ids, attention_mask, max_new_tokens, block_length, steps, "dream", sample, counts,
                "origin" if alg == "origin" else "confidence", threshold, policy, callback, generator,
                window_length)
