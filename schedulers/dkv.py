"""dKV-Cache (Ma et al., arXiv 2505.15781): delayed caching of decoded tokens' keys/values.

A token's K/V change sharply on the step it is decoded and little afterwards, so K/V are cached
only for tokens that were already real when they were computed (one step *after* decoding), and
the cache is rebuilt by a full forward every ``refresh_interval`` steps and at every block start.

Variants:

* ``decode``  – cache prompt + decoded tokens; recompute every MASK token and the tokens decoded on
  the previous step. Paper: interval 8 for LLaDA, 4 for Dream.
* ``prefill`` – cache only the prompt once, never refresh; recompute all generated positions.
* ``pd``      – prompt cached once and never refreshed; decoded tokens cached as in ``decode``,
  and a refresh recomputes only the generated part.
* ``greedy``  – needs random remasking (decode order known in advance): recompute only the tokens
  to be decoded this step, those decoded on the previous step and ``window_size`` masked
  neighbours; every other position, MASK tokens included, comes from the cache. Paper: interval 2.

Example::

    model = dcache.accelerate(model, policy="dkv", variant="decode", refresh_interval=8)
    out = model.generate(prompt_ids, gen_length=256, block_length=32, steps=256)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcache.registry import register_policy
from dcache.schedulers._dllm_plan import Plan, StepContext

VARIANTS = ("decode", "greedy", "prefill", "pd")


@register_policy("dkv", description="dKV-Cache: delayed K/V caching of decoded tokens (decode/greedy/prefill/pd)",
                 task="dllm", granularity="kv")
@dataclass
class DKVConfig:
    """``variant``: one of decode, greedy, prefill, pd. ``refresh_interval`` ≥ 1 steps between full
    refreshes (1 = every step, which reproduces the uncached sampler exactly). ``window_size`` ≥ 0:
    masked neighbours recomputed by ``greedy``."""

    variant: str = "decode"
    refresh_interval: int = 8
    window_size: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"dkv variant must be one of {VARIANTS}, got {self.variant!r}")
        if not isinstance(self.refresh_interval, int) or self.refresh_interval < 1:
            raise ValueError(f"refresh_interval must be an int >= 1, got {self.refresh_interval!r}")
        if not isinstance(self.window_size, int) or self.window_size < 0:
            raise ValueError(f"window_size must be an int >= 0, got {self.window_size!r}")

    threshold = None  # fixed per-step token counts, as in the paper

    def make_planner(self) -> "DKVPlanner":
        return DKVPlanner(self)


class DKVPlanner:
    """Per-run state: which canvas slots hold usable cached K/V."""

    def __init__(self, cfg: DKVConfig) -> None:
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        self.valid: torch.Tensor | None = None
        self.started = False

    def plan(self, ctx: StepContext) -> Plan:
        v = self.cfg.variant
        gen = torch.zeros_like(ctx.masked)
        gen[:, ctx.prompt_len:] = True
        if v == "prefill":
            if not self.started:
                return Plan(full=True)
            return Plan(full=False, active=gen, keys=self.valid)
        if v == "pd":
            if not self.started:
                return Plan(full=True)
            if ctx.block_step % self.cfg.refresh_interval == 0:
                # refresh the generated part only; the prompt cache is never recomputed
                return Plan(full=False, active=gen, keys=~gen & ctx.attention_mask)
            return Plan(full=False, active=~self.valid, keys=self.valid)
        refresh = ctx.block_step % self.cfg.refresh_interval == 0 or not self.started
        if refresh:
            return Plan(full=True)
        if v == "decode":
            return Plan(full=False, active=~self.valid, keys=self.valid)
        # greedy
        if ctx.decode_next is None:
            raise ValueError("dkv variant 'greedy' needs remasking='random' (the decode order must be known)")
        act = ctx.decode_next | ctx.decoded_prev
        w = self.cfg.window_size
        if w:
            nxt = ctx.decode_next.float()[:, None]
            near = torch.nn.functional.max_pool1d(nxt, 2 * w + 1, stride=1, padding=w)[:, 0] > 0
            act = act | (near & ctx.masked)
        return Plan(full=False, active=act, keys=self.valid)

    def observe(self, ctx: StepContext, plan: Plan) -> None:
        self.started = True
        v = self.cfg.variant
        real = ~ctx.masked & ctx.attention_mask
        if v == "prefill":
            if plan.full:
                self.valid = ~self._gen(ctx) & ctx.attention_mask
            return
        if v == "greedy":
            if plan.full:
                # greedy keeps MASK tokens' K/V too: everything just computed is usable
                self.valid = ctx.attention_mask.clone()
            return
        if plan.full:
            self.valid = real.clone()
        else:
            self.valid = self.valid | (plan.active & real)
        if v == "pd" and plan.full:
            self.valid = self.valid | (~self._gen(ctx) & ctx.attention_mask)

    @staticmethod
    def _gen(ctx: StepContext) -> torch.Tensor:
        gen = torch.zeros_like(ctx.masked)
        gen[:, ctx.prompt_len:] = True
        return gen
