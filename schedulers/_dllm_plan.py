"""What a dLLM KV policy sees each denoising step and what it answers (shared by dkv, Fast-dLLM
caches and elastic). Imports only torch: policies never touch model classes.

The generation loop builds a :class:`StepContext`, asks the policy's planner for a :class:`Plan`
(full forward, or which positions to recompute and which cached K/V slots to use), runs it, then
calls ``planner.observe(ctx, plan)`` so the planner can mark what became cacheable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["StepContext", "Plan"]


@dataclass
class StepContext:
    x: torch.Tensor                     # (B, L) canvas before this step's commits
    mask_id: int
    prompt_len: int                     # generation starts at this column (prompts are left-padded)
    attention_mask: torch.Tensor        # (B, L) bool, False on padding
    block: tuple[int, int]              # [start, end) columns of the current block
    step: int                           # global step index
    block_step: int                     # step index inside the current block
    decode_next: torch.Tensor | None    # (B, L) bool: positions this step will commit, when known
    decoded_prev: torch.Tensor          # (B, L) bool: positions committed at the previous step
    candidates: torch.Tensor | None = None  # (B, L) bool: masked positions this step may commit
                                            # (the block's, or the sliding window's)

    @property
    def masked(self) -> torch.Tensor:
        return self.x == self.mask_id


@dataclass
class Plan:
    full: bool                              # run every position; refills the whole cache
    active: torch.Tensor | None = None      # (B, L) bool: positions recomputed this step
    keys: torch.Tensor | None = None        # (B, L) bool: cached slots used as keys
    store: bool = True                      # on a full forward, write the cache
    attn_mask: torch.Tensor | None = None   # (B, L, L) bool on full forwards: allowed query→key pairs
    canvas: torch.Tensor | None = None      # (B, L) tokens fed to the model instead of ctx.x (ablations)
