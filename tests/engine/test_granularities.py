"""The block-range and guidance installers with the smallest policies of their bases, checked
against values recorded on the real model (the bases the Policies issues build on)."""

from dataclasses import dataclass

import pytest
import torch

import dcache
from dcache.registry import _POLICIES, register_policy
from dcache.schedulers._base import BlockPolicy, GuidancePolicy, PolicyState


class _Nothing(PolicyState):
    def reset(self):
        pass


class SkipBlockOnOddSteps(BlockPolicy):
    """Δ-DiT-like: block 1 reuses its residual on odd steps."""

    def new_state(self):
        return _Nothing()

    def blocks(self, num_blocks):
        return [1]

    def decide(self, state, step, index, hidden):
        return step.index % 2 == 0


class DeltaState(PolicyState):
    def __init__(self):
        self.reset()

    def reset(self):
        self.delta = None


class UncondFromLastDelta(GuidancePolicy):
    """uncond(t) = cond(t) + (uncond - cond) at the last step both were computed; computed every 2nd step."""

    def new_state(self):
        return DeltaState()

    def decide(self, state, step, branch):
        return state.delta is None or step.index % 2 == 0

    def store(self, state, step, branch, prediction):
        if branch == 0:
            state.cond = prediction
        elif step.index % 2 == 0 or state.delta is None:
            state.delta = prediction - state.cond

    def produce(self, state, step, branch, this_step):
        return this_step[0] + state.delta


@pytest.fixture
def registered():
    @register_policy("test-block-odd", description="test", granularity="block")
    @dataclass
    class BlockCfg:
        def build(self, env):
            return SkipBlockOnOddSteps()

    @register_policy("test-uncond-delta", description="test", granularity="guidance")
    @dataclass
    class GuidanceCfg:
        def build(self, env):
            return UncondFromLastDelta()

    yield
    _POLICIES.pop("test-block-odd", None)
    _POLICIES.pop("test-uncond-delta", None)


def test_block_range_reuses_that_blocks_own_residual(tiny_pipes, registered):
    pipe, kw, attr, _ = tiny_pipes("wan")
    block = pipe.transformer.blocks[1]
    rec = []
    h = block.register_forward_hook(lambda m, a, o: rec.append((a[0].detach().clone(), o.detach().clone())))
    inner = [0]
    h2 = block.attn1.to_q.register_forward_hook(lambda *a: inner.__setitem__(0, inner[0] + 1))
    try:
        with dcache.accelerated(pipe, "test-block-odd"):
            pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=4, **kw)
            stats = pipe.dcache.stats()
    finally:
        h.remove()
        h2.remove()
    assert len(rec) == 8 and inner[0] == 4  # 4 steps x 2 branches; odd steps skip the block
    for call in (2, 3, 6, 7):  # step 1 and 3, both branches
        x_prev, y_prev = rec[call - 2]
        x, y = rec[call]
        torch.testing.assert_close(y, x + (y_prev - x_prev), atol=1e-6, rtol=1e-6)
    assert stats["reused"] == 4 and stats["flops_avoided_fraction"] > 0


def test_guidance_branch_produced_from_the_cond_pass(tiny_pipes, registered):
    pipe, kw, attr, _ = tiny_pipes("wan")
    preds = []
    h = pipe.transformer.register_forward_hook(lambda m, a, o: preds.append(o[0].detach().clone()))
    try:
        with dcache.accelerated(pipe, "test-uncond-delta"):
            pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=4, **kw)
            stats = pipe.dcache.stats()
    finally:
        h.remove()
    assert len(preds) == 8
    tl = stats["timeline"]
    assert [e["sites"].get("guidance") for e in tl if e["branch"] == 1] == ["computed", "reused", "computed",
                                                                             "reused"]
    for s in (1, 3):
        cond_prev, uncond_prev = preds[2 * (s - 1)], preds[2 * (s - 1) + 1]
        cond, uncond = preds[2 * s], preds[2 * s + 1]
        torch.testing.assert_close(uncond, cond + (uncond_prev - cond_prev), atol=1e-6, rtol=1e-6)
