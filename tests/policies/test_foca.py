"""FoCa: the forecast and the calibration against a hand recursion written from the paper's equations.

The hand recursion (``hand_foca``) restates arXiv 2508.16211's predictor and corrector step by step in
float64 (shared/reference/caching-algorithms.md §3.1): BDF2 predictor from the two most recent values,
cached or computed, with F'_k their backward difference; Heun corrector averaging the derivative at
the last computed step with the one the predictor implies. It is driven on scripted feature
trajectories (the policy alone) and on the outputs a real tiny pipeline's site recorded (both CFG
layouts), and the Triton kernel (interpreter) is checked against the torch reference and the formula.
"""

import pytest
import torch

import dcache
from test_adapters_policies import BLOCK_FAMILIES as FAMILIES  # tests/ is on sys.path (conftest)
from dcache.kernels import foca as ops
from dcache.run import Step
from dcache.schedulers._common import Action, PolicyEnv
from dcache.schedulers.foca import FoCaConfig
from forecast_checks import hand_foca, hand_schedule

ENV = PolicyEnv(family="test", num_blocks=2, has_blocks=True)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def trajectory(n, shape=(2, 5, 7)):
    """Per element a + b s + c s² + d e^{-s/4}: curvature and decay, different per element."""
    a, b, c, d = (torch.randn(shape, generator=gen(i), dtype=torch.float64) for i in range(4))
    return [a + b * s + 0.05 * c * s * s + d * torch.exp(torch.tensor(-s / 4.0, dtype=torch.float64))
            for s in range(n)]


def drive(policy, values, n, sub_calls=1):
    """Run the policy on one site as the module installer does: action per step, store or produce."""
    state, site = policy.new_state(), policy.new_site_state()
    acts, outs = [], []
    for s in range(n):
        step = Step(s, 0, float(n - s), n)
        act = policy.action(state, step)
        acts.append(act is Action.COMPUTE)
        for sub in range(sub_calls):
            step.sub = sub
            if act is Action.COMPUTE:
                v = values[s].float() + sub  # a corrector call's value must not enter the history
                policy.store(site, v, step)
                out = v
            else:
                out = policy.produce(site, step)
            if sub == 0:
                outs.append(out.double())
    return acts, outs


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("DCACHE_FORCE_TRITON", "1")
    else:
        monkeypatch.setenv("DCACHE_DISABLE_TRITON", "1")
    return request.param


@pytest.mark.parametrize("interval,warmup", [(4, 2), (6, 3), (3, 0)])
def test_forecast_and_calibration_follow_the_hand_recursion(interval, warmup, backend):
    n = 20
    values = trajectory(n)
    policy = FoCaConfig(interval=interval, warmup_steps=warmup).build(ENV)
    acts, outs = drive(policy, values, n)
    schedule = hand_schedule(n, interval, warmup, True)
    assert acts == schedule
    want = hand_foca(schedule, [v for v, c in zip(values, schedule) if c])
    for s in range(n):
        torch.testing.assert_close(outs[s], want[s], atol=2e-5, rtol=2e-5, msg=f"step {s}")
    # The forecast is not a reuse nor a Taylor line here: the scripted curvature makes them differ.
    forecast_steps = [s for s in range(n) if not schedule[s]]
    assert len(forecast_steps) >= 8
    s = forecast_steps[-1]
    assert (want[s] - values[s - 1]).abs().max() > 1e-2


def test_second_order_scheduler_corrector_calls_keep_the_first_value():
    n = 14
    values = trajectory(n)
    policy = FoCaConfig(interval=3, warmup_steps=2).build(ENV)
    _, outs = drive(policy, values, n, sub_calls=2)
    schedule = hand_schedule(n, 3, 2, True)
    want = hand_foca(schedule, [v for v, c in zip(values, schedule) if c])
    for s in range(n):
        torch.testing.assert_close(outs[s], want[s], atol=2e-5, rtol=2e-5)


def test_linear_features_are_forecast_exactly():
    n = 16
    base, slope = torch.randn(3, 8, generator=gen(1)), torch.randn(3, 8, generator=gen(2))
    values = [base + slope * s for s in range(n)]
    policy = FoCaConfig(interval=5, warmup_steps=2).build(ENV)
    acts, outs = drive(policy, values, n)
    assert acts.count(False) >= 8
    for s in range(n):
        torch.testing.assert_close(outs[s].float(), values[s], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# kernels: Triton (interpreter) against the torch reference and the formula
# ---------------------------------------------------------------------------------------------
def test_forecast_kernel_is_the_formula(backend):
    torch.manual_seed(0)
    hist = torch.randn(4, 3, 33, 10)
    cur, prev, full, dfull = (hist[i].clone().double() for i in range(4))
    h = 2.0
    predicted = 4 / 3 * cur - 1 / 3 * prev + 2 * h / 3 * dfull
    want = cur + h / 2 * (dfull + (predicted - cur) / h)
    out = ops.forecast(hist, h)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hist[ops.CUR].double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hist[ops.PREV].double(), cur)
    torch.testing.assert_close(hist[ops.FULL].double(), full)


def test_forecast_kernel_selects_a_solver_per_channel(backend):
    torch.manual_seed(1)
    hist = torch.randn(4, 2, 9, 6)
    codes = torch.tensor([0, 1, 2, 2, 1, 0])
    ref_hist = hist.clone()
    k = 4.0
    foca_all = ops.forecast_torch(ref_hist, 1.0)
    out = ops.forecast(hist, 1.0, codes=codes, k_full=k)
    full, dfull = ref_hist[ops.FULL], ref_hist[ops.DFULL]
    for c, code in enumerate(codes.tolist()):
        want = {0: full[..., c], 1: full[..., c] + k * dfull[..., c], 2: foca_all[..., c]}[code]
        torch.testing.assert_close(out[..., c], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hist, ref_hist, atol=1e-6, rtol=1e-6)  # the window advances for all


@pytest.mark.parametrize("n_full", [0, 2])
def test_calibrate_kernel_matches_torch(n_full, monkeypatch):
    pytest.importorskip("triton")
    torch.manual_seed(2)
    a = torch.randn(4, 1000)
    old = a.clone()
    b = a.clone()
    x = torch.randn(1000)
    assert ops.calibrate_torch(a, n_full, x, 3.0) == n_full + 1
    monkeypatch.setenv("DCACHE_FORCE_TRITON", "1")
    assert ops.calibrate(b, n_full, x, 3.0) == n_full + 1
    torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    # by hand: the first value seeds every slot; later ones move the anchor and the window
    if n_full:
        want = [x, old[ops.CUR], x, (x - old[ops.FULL]) / 3.0]
    else:
        want = [x, x, x, torch.zeros_like(x)]
    torch.testing.assert_close(b, torch.stack(want), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forecast_triton_matches_torch(dtype, monkeypatch):
    pytest.importorskip("triton")
    torch.manual_seed(3)
    a = torch.randn(4, 5, 37, 11).to(dtype)
    b = a.clone()
    ref = ops.forecast_torch(a, 2.0, torch.float32)
    monkeypatch.setenv("DCACHE_FORCE_TRITON", "1")
    out = ops.forecast(b, 2.0, torch.float32)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(b.float(), a.float(), atol=tol, rtol=tol)


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match="interval"):
        FoCaConfig(interval=0)
    with pytest.raises(ValueError, match="dtype"):
        FoCaConfig(dtype="float8")
    with pytest.raises(ValueError, match="hist must have shape"):
        ops.forecast(torch.zeros(3, 4), 1.0)
    with pytest.raises(ValueError, match="positive"):
        ops.forecast(torch.zeros(4, 4), 0.0)


# ---------------------------------------------------------------------------------------------
# real pipelines
# ---------------------------------------------------------------------------------------------
def recorded_check(pipe, kw, attr, site, name, steps, branches, **options):
    seen = []
    h = site.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        with dcache.accelerated(pipe, "foca", **options):
            pipe(generator=gen(), num_inference_steps=steps, **kw)
            stats = pipe.dcache.stats()
    finally:
        h.remove()
    tl = stats["timeline"]
    assert len(seen) == len(tl) == steps * branches
    checked = 0
    for branch in range(branches):
        rows = [(e, out) for e, out in zip(tl, seen) if e["branch"] == branch]
        schedule = [e["sites"][name] == "computed" for e, _ in rows]
        assert schedule == hand_schedule(steps, options["interval"], options["warmup_steps"], True)
        want = hand_foca(schedule, [out for (_, out), c in zip(rows, schedule) if c])
        for s, ((e, out), c) in enumerate(zip(rows, schedule)):
            if not c:
                torch.testing.assert_close(out.double(), want[s], atol=1e-5, rtol=1e-4)
                checked += 1
    return checked


def test_sequential_cfg_branches_keep_their_own_history(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    kw = dict(kw, negative_prompt_embeds=torch.randn(1, 8, 32, generator=gen(5)),
              negative_pooled_prompt_embeds=torch.randn(1, 32, generator=gen(6)), true_cfg_scale=4.0)
    site = pipe.transformer.transformer_blocks[1].ff
    checked = recorded_check(pipe, kw, attr, site, "FluxTransformer2DModel.transformer_blocks.1.ff", 12, 2,
                             interval=4, warmup_steps=1)
    assert checked == 2 * 8


def test_batched_cfg_forecast_is_the_hand_recursion(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("sd3")
    site = pipe.transformer.transformer_blocks[1].ff
    checked = recorded_check(pipe, kw, attr, site, "SD3Transformer2DModel.transformer_blocks.1.ff", 10, 1,
                             interval=3, warmup_steps=2)
    assert checked == 5


STEPS = 8


def run(pipe, kw, attr):
    return getattr(pipe(generator=gen(), num_inference_steps=STEPS, **kw), attr)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_adapter(family, tiny_pipes):
    pipe, kw, attr, inner = tiny_pipes(family)
    calls = []
    h = inner.register_forward_hook(lambda *a: calls.append(1))
    base = run(pipe, kw, attr)
    base_calls, calls[:] = len(calls), []
    try:
        with dcache.accelerated(pipe, "foca", interval=3, warmup_steps=1):
            out1 = run(pipe, kw, attr)
            n1 = len(calls)
            stats1 = pipe.dcache.stats()
            out2 = run(pipe, kw, attr)
            stats2 = pipe.dcache.stats()
    finally:
        h.remove()
    assert out1.shape == base.shape and torch.isfinite(out1).all()
    assert n1 < base_calls, f"foca did not skip the inner layer ({n1} of {base_calls})"
    # computed on steps 0, 3, 6 and the last (7): 4 of 8
    assert n1 * STEPS == base_calls * 4
    assert stats1["forecast"] > 0 and stats1["reused"] == 0
    assert torch.equal(out1, out2), "second run differs: state leaked between runs"
    assert {k: v for k, v in stats1.items() if k != "timeline"} == {k: v for k, v in stats2.items() if k != "timeline"}
    assert torch.equal(run(pipe, kw, attr), base), "disable did not restore the exact original"


def test_unet_is_refused_with_a_clear_error(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("sd_unet")
    with pytest.raises(ValueError, match="foca forecasts module outputs.*none, static, teacache"):
        dcache.accelerate(pipe, "foca")
    assert "dcache" not in pipe.__dict__
