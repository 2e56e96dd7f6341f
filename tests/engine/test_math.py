"""The numbers each policy produces, checked against an independent computation.

A forecast against a hand Taylor sum of the site's recorded outputs; TeaCache's accumulator and
reset against a scripted distance sequence; FBCache's reference being the last computed step; a
reused step's output equal to the span input plus the span's own residual, for every adapter and
per branch under both CFG layouts (sequential: Wan, Flux true-CFG; batched: SD3, PixArt).
"""

import math

import pytest
import torch

import dcache
from dcache.kernels.rel_l1 import rel_l1
from dcache.pipelines.adapters import get_adapter
from dcache.run import Step


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# TaylorSeer: forecast = Σ Fᵢ kⁱ / i!, Fᵢ divided differences of the computed values
# ---------------------------------------------------------------------------------------------
def hand_taylor(values, steps, k, order):
    """Divided differences of the last order+1 computed values (at ``steps``), then the sum."""
    terms = [values[-1]]
    diffs = list(values)
    xs = list(steps)
    for _ in range(order):
        if len(diffs) < 2:
            break
        # Backward differences over the gap between consecutive computed steps.
        diffs = [(diffs[i + 1] - diffs[i]) / (xs[i + 1] - xs[i]) for i in range(len(diffs) - 1)]
        xs = xs[1:]
        terms.append(diffs[-1])
    return sum(t * k**i / math.factorial(i) for i, t in enumerate(terms))


@pytest.mark.parametrize("order", [1, 2])
def test_taylorseer_forecast_is_the_hand_taylor_sum(order, tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    kw = dict(kw, negative_prompt_embeds=torch.randn(1, 8, 32, generator=gen(5)),
              negative_pooled_prompt_embeds=torch.randn(1, 32, generator=gen(6)), true_cfg_scale=4.0)
    site = pipe.transformer.transformer_blocks[1].ff
    seen = []
    h = site.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        with dcache.accelerated(pipe, "taylorseer", interval=3, order=order, warmup_steps=1, compute_last=False):
            pipe(generator=gen(), num_inference_steps=9, **kw)
            stats = pipe.dcache.stats()
    finally:
        h.remove()
    name = "FluxTransformer2DModel.transformer_blocks.1.ff"
    tl = stats["timeline"]
    assert len(seen) == len(tl) == 18  # two sequential CFG branches per step
    checked = 0
    for branch in (0, 1):
        values, steps = [], []
        for e, out in zip(tl, seen):
            if e["branch"] != branch:
                continue
            if e["sites"][name] == "computed":
                values.append(out)
                steps.append(e["step"])
            else:
                assert e["sites"][name] == "forecast"
                expected = hand_taylor(values[-(order + 1):], steps[-(order + 1):], e["step"] - steps[-1], order)
                torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
                checked += 1
    assert steps == [0, 3, 6] and checked == 2 * 6


# ---------------------------------------------------------------------------------------------
# TeaCache: accumulate max(poly(d), 0), recompute at the threshold, reset after a compute
# ---------------------------------------------------------------------------------------------
def scripted_probes(distances):
    """Probes whose consecutive relative-L1 distances are exactly ``distances``."""
    p = torch.linspace(1.0, 2.0, 64)
    out = [p]
    for d in distances:
        p = p * (1.0 + d)
        out.append(p)
    return out


def test_teacache_accumulator_and_reset_on_a_scripted_distance_sequence():
    from dcache.schedulers._common import PolicyEnv
    from dcache.schedulers.teacache import TeaCacheConfig

    coeffs = [3.0, -0.05]  # rescale(d) = 3d - 0.05: negative for d < 1/60
    distances = [0.02, 0.05, 0.01, 0.004, 0.06, 0.03, 0.001, 0.05, 0.05, 0.02, 0.07]
    cfg = TeaCacheConfig(threshold=0.2, coefficients=coeffs, warmup_steps=2, compute_last=True)
    policy = cfg.build(PolicyEnv(family="test", num_blocks=2, has_blocks=True))
    state = policy.new_state()
    n = len(distances) + 1
    got = [policy.decide(state, Step(i, 0, 0.0, n), p) for i, p in enumerate(scripted_probes(distances))]
    # The hand accumulator.
    want, acc = [True], 0.0
    for i, d in enumerate(distances, start=1):
        if i < 2 or i == n - 1:
            want.append(True)
            acc = 0.0
            continue
        acc += max(coeffs[0] * d + coeffs[1], 0.0)
        if acc < 0.2:
            want.append(False)
        else:
            want.append(True)
            acc = 0.0
    assert got == want
    assert got.count(False) >= 3 and got[2:].count(True) >= 2  # the sequence exercises both paths
    assert state.last_distance == pytest.approx(distances[-1], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# FBCache: the distance is to the last *computed* step's residual, so drift accumulates
# ---------------------------------------------------------------------------------------------
def test_fbcache_reference_is_the_last_computed_step():
    from dcache.schedulers._common import PolicyEnv
    from dcache.schedulers.fbcache import FBCacheConfig

    policy = FBCacheConfig(threshold=0.1, warmup_steps=1).build(PolicyEnv(family="t", num_blocks=4, has_blocks=True))
    state = policy.new_state()
    # Each step changes by 4%: never above the threshold step to step, but the drift is.
    signals = scripted_probes([0.04] * 9)
    got = [policy.decide(state, Step(i, 0, 0.0, 10), s) for i, s in enumerate(signals)]
    want, ref = [], None
    for i, s in enumerate(signals):
        if ref is not None and i >= 1 and float(rel_l1(s, ref)) < 0.1:
            want.append(False)
        else:
            want.append(True)
            ref = s
    assert got == want
    assert got == [True, False, False, True, False, False, True, False, False, True]


def test_fbcache_signal_is_the_first_blocks_residual(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    block = pipe.transformer.transformer_blocks[0]
    residuals = []

    def record(module, args, kwargs, out):
        residuals.append(out[1] - kwargs["hidden_states"])

    h = block.register_forward_hook(record, with_kwargs=True)
    dcache.accelerate(pipe, "fbcache", threshold=0.5)
    signals = []
    policy = pipe.dcache.policies[0]
    real = policy.decide
    policy.decide = lambda state, step, signal: (signals.append(signal.clone()), real(state, step, signal))[1]
    try:
        pipe(generator=gen(), num_inference_steps=5, **kw)
    finally:
        dcache.disable(pipe)
        h.remove()
    assert len(signals) == len(residuals) == 5
    for s, r in zip(signals, residuals):
        assert torch.equal(s, r)


# ---------------------------------------------------------------------------------------------
# A reused step returns span input + the span's own residual, for every adapter and branch
# ---------------------------------------------------------------------------------------------
BLOCK_FAMILIES = ["flux", "flux_cfg", "sd3", "pixart", "dit", "wan", "cogvideox", "hunyuan_video", "ltx",
                  "qwenimage", "flux_controlnet"]


def _pipe(name, tiny_pipes):
    if name == "flux_cfg":
        pipe, kw, attr, inner = tiny_pipes("flux")
        kw = dict(kw, negative_prompt_embeds=torch.randn(1, 8, 32, generator=gen(5)),
                  negative_pooled_prompt_embeds=torch.randn(1, 32, generator=gen(6)), true_cfg_scale=4.0)
        return pipe, kw, attr
    pipe, kw, attr, _ = tiny_pipes(name)
    return pipe, kw, attr


class BlockRecorder:
    """Inputs and outputs (hidden, encoder) of every block call, as the model sees them."""

    def __init__(self, blocks, adapter):
        self.calls = {i: [] for i in range(len(blocks))}
        self.handles = []
        for i, b in enumerate(blocks):
            spec = adapter.spec(b)
            self.handles.append(b.register_forward_hook(self._hook(i, b, spec), with_kwargs=True))

    def _hook(self, i, block, spec):
        from dcache.installers._common import unpack
        from dcache.pipelines.adapters.base import get_arg

        def hook(module, args, kwargs, out):
            h_in = get_arg(block, spec.hidden, args, kwargs)
            e_in = get_arg(block, spec.encoder, args, kwargs) if spec.encoder else None
            h_out, e_out = unpack(spec, out)
            self.calls[i].append((h_in.detach().clone(), None if e_in is None else e_in.detach().clone(),
                                  h_out.detach().clone(), None if e_out is None else e_out.detach().clone()))

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", BLOCK_FAMILIES)
def test_reused_step_is_span_input_plus_cached_residual(family, tiny_pipes):
    pipe, kw, attr = _pipe(family, tiny_pipes)
    tr = pipe.transformer
    adapter = get_adapter(tr)
    blocks = adapter.blocks(tr)
    rec = BlockRecorder(blocks, adapter)
    try:
        with dcache.accelerated(pipe, "static", interval=2, warmup_steps=1, compute_last=False):
            pipe(generator=gen(), num_inference_steps=5, **kw)
            tl = pipe.dcache.stats()["timeline"]
    finally:
        rec.remove()
    first, last = 0, len(blocks) - 1
    site = f"blocks[0:{len(blocks)}]"
    cached = {}  # branch -> (residual hidden, residual encoder)
    checked = 0
    for call, e in enumerate(tl):
        kind = e["sites"][site]
        b = e["branch"]
        # Forward hooks fire on every block call (a passed-through block too): index by call.
        if kind == "computed":
            h_in, e_in = rec.calls[first][call][:2]
            res_h = rec.calls[last][call][2] - h_in
            e_last = rec.calls[last][call][3]
            res_e = None if (e_in is None or e_last is None) else e_last - e_in
            # The model's own additions between blocks (ControlNet samples) are not the span's.
            for i in range(first + 1, last + 1):
                res_h = res_h - (rec.calls[i][call][0] - rec.calls[i - 1][call][2])
                if res_e is not None:
                    res_e = res_e - (rec.calls[i][call][1] - rec.calls[i - 1][call][3])
            cached[b] = (res_h, res_e)
        else:
            assert kind == "reused"
            h_in, e_in, h_out, e_out = rec.calls[first][call]
            torch.testing.assert_close(h_out, h_in + cached[b][0], atol=1e-6, rtol=1e-6)
            if e_in is not None and cached[b][1] is not None:
                torch.testing.assert_close(e_out, e_in + cached[b][1], atol=1e-6, rtol=1e-6)
            checked += 1
    assert checked >= 2
    if family in ("flux_cfg", "wan"):
        assert {e["branch"] for e in tl} == {0, 1}
        r0, r1 = cached[0][0], cached[1][0]
        assert (r0 - r1).abs().max() > 1e-6, "the branches share one residual"

