"""HyCa: the solver each channel group gets, the profile file, and its values in use.

The profile run is driven on synthetic site trajectories whose right solver is known per channel
(constant channels: reuse is exact and cheapest; linear channels: Taylor is exact, reuse is not;
curved channels: the errors are computed by hand from the same replayed schedule and compared).
In use, each channel's forecast is checked against its own solver computed independently
(reuse = last computed value; Taylor = last value + distance × divided difference; FoCa = the
hand recursion of test_foca).
"""

import json

import pytest
import torch

import dcache
from dcache.run import Step
from dcache.schedulers._common import Action, PolicyEnv
from dcache.schedulers.hyca import HyCaConfig, group_codes

from forecast_checks import hand_foca, hand_schedule

ENV = PolicyEnv(family="test", num_blocks=2, has_blocks=True, model_class="ToyModel", config_hash="abc123")
N = 16


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def synthetic(n=N, tokens=6):
    """Channels 0-3 constant, 4-7 linear in the step, 8-11 quadratic-with-decay (curved)."""
    a = torch.randn(2, tokens, 12, generator=gen(1), dtype=torch.float64)
    b = torch.randn(2, tokens, 12, generator=gen(2), dtype=torch.float64)
    out = []
    for s in range(n):
        v = a.clone()
        v[..., 4:8] += b[..., 4:8] * s
        v[..., 8:] += 0.3 * b[..., 8:] * s * s / n + torch.exp(torch.tensor(-s / 3.0, dtype=torch.float64)) * b[..., 8:]
        out.append(v)
    return out


def drive(policy, values, name="site[0]"):
    state, site = policy.new_state(), policy.new_site_state(name)
    acts, outs = [], []
    for s, v in enumerate(values):
        step = Step(s, 0, float(len(values) - s), len(values))
        act = policy.action(state, step)
        acts.append(act is Action.COMPUTE)
        if act is Action.COMPUTE:
            policy.store(site, v.float(), step)
            outs.append(v)
        else:
            outs.append(policy.produce(site, step).double())
            # a second-order scheduler's corrector call at the same step: the same value
            step.sub = 1
            torch.testing.assert_close(policy.produce(site, step).double(), outs[-1])
    return acts, outs


def profile_of(values, tmp_path, group_size=4, interval=4, warmup=2, env=ENV):
    path = tmp_path / "p.json"
    policy = HyCaConfig(profile_out=str(path), interval=interval, warmup_steps=warmup, group_size=group_size).build(env)
    acts, outs = drive(policy, values)
    policy.on_run_end()
    return path, acts, outs


def test_profile_run_picks_the_known_solver_per_group(tmp_path):
    values = synthetic()
    path, acts, outs = profile_of(values, tmp_path)
    assert all(acts), "a profile run computes every step"
    profile = json.loads(path.read_text())
    site = profile["sites"]["site[0]"]
    assert site["channels"] == 12
    assert site["solvers"][:2] == [0, 1]  # constant -> reuse (exact, cheapest), linear -> Taylor (exact)
    # the curved group: its errors by hand, on the schedule the profile run replays
    schedule = hand_schedule(N, 4, 2, True)
    computed = [(s, v) for s, v in enumerate(values) if schedule[s]]
    foca = hand_foca(schedule, [v for _, v in computed])
    want = torch.zeros(3, 3, dtype=torch.float64)
    for s in range(N):
        if schedule[s]:
            continue
        prior = [(t, v) for t, v in computed if t < s]
        (t1, v1) = prior[-1]
        d = (v1 - prior[-2][1]) / (t1 - prior[-2][0]) if len(prior) > 1 else torch.zeros_like(v1)
        preds = [v1, v1 + (s - t1) * d, foca[s]]
        for k, p in enumerate(preds):
            want[k] += ((p - values[s]) ** 2).sum(dim=(0, 1)).reshape(3, 4).sum(-1)
    got = torch.tensor(site["errors"], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert site["solvers"][2] == group_codes(want)[2]
    assert got[0, 0] == 0 and got[1, 1] < 1e-6 * got[0, 1]


@pytest.mark.parametrize("solvers", [[0, 1, 2], [0, 1, 1], [0, 0, 0]])  # with FoCa; without (one pass, no window)
def test_profile_round_trip_and_values_in_use(solvers, tmp_path):
    values = synthetic()
    path, _, _ = profile_of(values, tmp_path)
    profile = json.loads(path.read_text())
    profile["sites"]["site[0]"]["solvers"] = solvers
    path.write_text(json.dumps(profile))
    policy = HyCaConfig(profile=str(path), interval=4, warmup_steps=2).build(ENV)
    acts, outs = drive(policy, values)
    schedule = hand_schedule(N, 4, 2, True)
    assert acts == schedule
    foca = hand_foca(schedule, [v for v, c in zip(values, schedule) if c])
    last = None
    for s in range(N):
        if schedule[s]:
            prev_c, last = last, (s, values[s])
            continue
        t1, v1 = last
        d = (v1 - prev_c[1]) / (t1 - prev_c[0])
        by_code = {0: v1, 1: v1 + (s - t1) * d, 2: foca[s]}
        for g, code in enumerate(solvers):
            sl = slice(4 * g, 4 * g + 4)
            torch.testing.assert_close(outs[s][..., sl], by_code[code][..., sl], atol=1e-5, rtol=1e-5)


def test_profile_of_another_model_is_refused(tmp_path):
    path, _, _ = profile_of(synthetic(), tmp_path)
    other = PolicyEnv(family="test", num_blocks=2, has_blocks=True, model_class="ToyModel", config_hash="fff000")
    with pytest.raises(ValueError, match="measured on ToyModel .*config hash abc123.*fff000"):
        HyCaConfig(profile=str(path)).build(other)
    # same class and hash but a site it never saw, or other channel counts: refused at first use
    policy = HyCaConfig(profile=str(path), interval=4, warmup_steps=2).build(ENV)
    with pytest.raises(ValueError, match="no site 'elsewhere\\[0\\]'"):
        drive(policy, synthetic(), name="elsewhere[0]")
    profile = json.loads(path.read_text())
    profile["sites"]["site[0]"]["channels"] = 16
    path.write_text(json.dumps(profile))
    policy = HyCaConfig(profile=str(path), interval=4, warmup_steps=2).build(ENV)
    with pytest.raises(ValueError, match="16 channels there, 12 here"):
        drive(policy, synthetic())


def test_bad_config_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="exactly one of profile"):
        HyCaConfig()
    with pytest.raises(ValueError, match="exactly one of profile"):
        HyCaConfig(profile="a.json", profile_out="b.json")
    with pytest.raises(ValueError, match="not found"):
        HyCaConfig(profile=str(tmp_path / "missing.json"))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a hyca profile"):
        HyCaConfig(profile=str(tmp_path / "x.json"))
    with pytest.raises(ValueError, match="group_size"):
        HyCaConfig(profile_out="p.json", group_size=0)


# ---------------------------------------------------------------------------------------------
# real pipelines
# ---------------------------------------------------------------------------------------------
STEPS = 10


def run(pipe, kw, attr):
    return getattr(pipe(generator=gen(), num_inference_steps=STEPS, **kw), attr)


SLOW = ["dit", "cogvideox", "hunyuan_video", "ltx", "qwenimage"]


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart", "wan"] + [pytest.param(f, marks=pytest.mark.slow) for f in SLOW])
def test_profile_then_use_on_a_real_pipeline(family, tiny_pipes, tmp_path):
    pipe, kw, attr, inner = tiny_pipes(family)
    calls = []
    h = inner.register_forward_hook(lambda *a: calls.append(1))
    try:
        base = run(pipe, kw, attr)
        base_calls, calls[:] = len(calls), []
        path = tmp_path / "profile.json"
        with dcache.accelerated(pipe, "hyca", profile_out=str(path), interval=3, warmup_steps=1):
            prof_out = run(pipe, kw, attr)
        assert torch.equal(prof_out, base), "a profile run computes every step"
        profile = json.loads(path.read_text())
        assert profile["model"]["class"] == type(pipe.transformer).__name__
        assert all(s["channels"] > 0 and len(s["solvers"]) == -(-s["channels"] // 8) for s in profile["sites"].values())
        calls[:] = []
        with dcache.accelerated(pipe, "hyca", profile=str(path), interval=3, warmup_steps=1):
            out1 = run(pipe, kw, attr)
            n1 = len(calls)
            stats1 = {k: v for k, v in pipe.dcache.stats().items() if k != "timeline"}
            out2 = run(pipe, kw, attr)
            stats2 = {k: v for k, v in pipe.dcache.stats().items() if k != "timeline"}
    finally:
        h.remove()
    assert n1 * STEPS == base_calls * 4  # computed on steps 0, 3, 6 and 9 (also the last)
    assert torch.isfinite(out1).all() and stats1["forecast"] > 0
    # the profile names each output leaf of every hooked site
    assert {n.rsplit("[", 1)[0] for n in profile["sites"]} == set(stats1["sites"])
    assert torch.equal(out1, out2) and stats1 == stats2, "state leaked between runs"
    assert torch.equal(run(pipe, kw, attr), base), "disable did not restore the exact original"


def test_profile_of_one_pipeline_refused_on_another(tiny_pipes, tmp_path):
    pipe, kw, attr, _ = tiny_pipes("flux")
    path = tmp_path / "flux.json"
    with dcache.accelerated(pipe, "hyca", profile_out=str(path), interval=3, warmup_steps=1):
        run(pipe, kw, attr)
    other, _, _, _ = tiny_pipes("sd3")
    with pytest.raises(ValueError, match="measured on FluxTransformer2DModel.*this model is SD3Transformer2DModel"):
        dcache.accelerate(other, "hyca", profile=str(path))
    assert "dcache" not in other.__dict__


def test_unet_is_refused(tiny_pipes, tmp_path):
    pipe, _, _, _ = tiny_pipes("sd_unet")
    with pytest.raises(ValueError, match="hyca forecasts module outputs.*none, static, teacache"):
        dcache.accelerate(pipe, "hyca", profile_out=str(tmp_path / "p.json"))


def test_same_class_other_config_is_refused(tiny_pipes, tmp_path):
    import tiny

    pipe, kw, attr, _ = tiny_pipes("flux")
    path = tmp_path / "flux.json"
    with dcache.accelerated(pipe, "hyca", profile_out=str(path), interval=3, warmup_steps=1):
        run(pipe, kw, attr)
    other = tiny.flux(layers=1)[0]  # same class, one double block fewer
    with pytest.raises(ValueError, match="FluxTransformer2DModel \\(config hash [0-9a-f]{16}\\), this model is "
                                         "FluxTransformer2DModel \\(config hash [0-9a-f]{16}\\)"):
        dcache.accelerate(other, "hyca", profile=str(path))
