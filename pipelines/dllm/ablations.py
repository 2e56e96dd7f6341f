"""Deliberately broken decoders that a reference task must punish (bench rows and tests).

They are not policies (``dcache.policies`` does not list them); pass one as ``policy=`` to a
sampler, or use :func:`run_ablation`.

* ``one-shot``: the whole answer committed in one step (``steps=1``, one block): every position
  is decided independently, so answers that need agreement between tokens get mixed.
* ``no-answer-attention``: every step is a full forward in which answer queries may not attend
  to other answer positions (only to the prompt and to themselves).
* ``frozen-cache``: the K/V of every position are cached by the first forward and never refreshed;
  each later step recomputes only the masked tokens it may commit (for Dream also the slot before
  each, whose logit predicts it) from the first step's canvas, so no decoded token is ever seen.

Example::

    out = run_ablation("frozen-cache", model, prompts, mask, gen_length=256, block_length=32, steps=256)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dcache.schedulers._dllm_plan import Plan, StepContext

__all__ = ["ABLATIONS", "NoAnswerAttention", "FrozenCache", "run_ablation"]

ABLATIONS = ("one-shot", "no-answer-attention", "frozen-cache")


@dataclass
class NoAnswerAttention:
    policy_name = "no-answer-attention"
    threshold = None
    keep_hidden = False

    def make_planner(self) -> "_NoAnswerAttentionPlanner":
        return _NoAnswerAttentionPlanner()


class _NoAnswerAttentionPlanner:
    def reset(self) -> None:
        pass

    def plan(self, ctx: StepContext) -> Plan:
        B, L = ctx.x.shape
        ans = torch.zeros(L, dtype=torch.bool, device=ctx.x.device)
        ans[ctx.prompt_len:] = True
        cut = ans[:, None] & ans[None, :] & ~torch.eye(L, dtype=torch.bool, device=ctx.x.device)
        return Plan(full=True, store=False, attn_mask=(~cut).expand(B, L, L))

    def observe(self, ctx: StepContext, plan: Plan) -> None:
        pass


@dataclass
class FrozenCache:
    policy_name = "frozen-cache"
    threshold = None
    keep_hidden = False

    def make_planner(self) -> "_FrozenCachePlanner":
        return _FrozenCachePlanner()


class _FrozenCachePlanner:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.first: torch.Tensor | None = None

    def plan(self, ctx: StepContext) -> Plan:
        if self.first is None:
            self.first = ctx.x.clone()
            return Plan(full=True)
        # the first step's canvas: a recomputed slot that was decoded since still reads MASK
        return Plan(full=False, active=ctx.candidates.clone(), keys=ctx.attention_mask.clone(), canvas=self.first)

    def observe(self, ctx: StepContext, plan: Plan) -> None:
        pass


def run_ablation(name: str, model: Any, prompts: Any, attention_mask: torch.Tensor | None = None, *,
                 gen_length: int, block_length: int, steps: int, **kw: Any):
    """Generate with one of :data:`ABLATIONS` on the family's sampler (LLaDA or Dream)."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; accepted: {', '.join(ABLATIONS)}")
    from dcache.pipelines.dllm.generate import dream_generate, llada_generate

    fn, length = (llada_generate, "gen_length") if model.logits_shift == 0 else (dream_generate, "max_new_tokens")
    if name == "one-shot":
        return fn(model, prompts, attention_mask, **{length: gen_length}, block_length=gen_length, steps=1, **kw)
    policy = NoAnswerAttention() if name == "no-answer-attention" else FrozenCache()
    return fn(model, prompts, attention_mask, **{length: gen_length}, block_length=block_length, steps=steps,
              policy=policy, **kw)
