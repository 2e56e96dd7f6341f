"""magcache: decisions against a hand simulation of the published rule, tables (interpolation,
cond/uncond interleaving), calibration values against residual norms measured independently with
forward hooks, every adapter with a block chain, the errors, no state across runs, exact disable."""

import json

import pytest
import torch

import dcache
from test_adapters_policies import BLOCK_FAMILIES as FAMILIES  # tests/ is on sys.path (conftest)
from dcache.schedulers._magcache_tables import TABLES

STEPS = 10


def gen():
    return torch.Generator().manual_seed(0)


def hand_mask(ratios, steps, threshold, k, retention):
    """The MagCache rule written out (shared/reference/caching-algorithms.md): True = compute."""
    keep = int(retention * steps + 0.5)
    acc_ratio, acc_err, acc_steps, out = 1.0, 0.0, 0, []
    for s in range(steps):
        if s < keep:
            out.append(True)
            continue
        acc_ratio *= ratios[s]
        acc_steps += 1
        acc_err += abs(1 - acc_ratio)
        if acc_err <= threshold and acc_steps <= k:
            out.append(False)
        else:
            acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
            out.append(True)
    return out


def masks(pipe, branches):
    tl = pipe.dcache.stats()["timeline"]
    return [[e["sites"] and "computed" in e["sites"].values() for e in tl if e["branch"] == b] for b in range(branches)]


# A steady drift (cond) makes the error of the accumulated ratio differ from that of each step's
# ratio: a rule that added |1 - gamma_t| instead of |1 - prod gamma| would skip one more step.
COND = [1.0, 0.98, 0.98, 0.98, 0.98, 0.98, 0.98, 0.98, 0.98, 0.98]
UNCOND = [1.0, 1.0, 1.01, 0.99, 1.0, 1.03, 1.0, 0.96, 1.0, 1.0]


@pytest.fixture(scope="module")
def flux_cfg():
    import tiny

    pipe, kw, attr, inner = tiny.flux(cfg=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(kw, num_inference_steps=STEPS), attr


def test_decisions_follow_the_rule_per_branch(flux_cfg):
    pipe, kw, attr = flux_cfg
    opts = dict(threshold=0.1, max_skip_steps=3, retention_ratio=0.2)
    expected = [hand_mask(r, STEPS, 0.1, 3, 0.2) for r in (COND, UNCOND)]
    assert expected[0] != expected[1] and not all(expected[0]) and not all(expected[1])
    with dcache.accelerated(pipe, "magcache", mag_ratios=[COND, UNCOND], **opts):
        out1 = getattr(pipe(generator=gen(), **kw), attr)
        got, stats1 = masks(pipe, 2), pipe.dcache.stats()
        out2 = getattr(pipe(generator=gen(), **kw), attr)
        stats2 = pipe.dcache.stats()
    assert got == expected
    # no state across runs
    assert torch.equal(out1, out2) and stats1 == stats2
    # an interleaved flat table is the same two tables
    flat = [v for pair in zip(COND, UNCOND) for v in pair]
    with dcache.accelerated(pipe, "magcache", mag_ratios=flat, interleaved=True, **opts):
        assert torch.equal(getattr(pipe(generator=gen(), **kw), attr), out1)
    # disable is exact
    base = getattr(pipe(generator=gen(), **kw), attr)
    with dcache.accelerated(pipe, "none"):
        assert torch.equal(getattr(pipe(generator=gen(), **kw), attr), base)
    assert not torch.equal(out1, base)


def test_tables_are_resampled_to_the_step_count(flux_cfg):
    pipe, kw, attr = flux_cfg
    # 19 entries for 10 steps: nearest neighbour keeps entries 0, 2, 4, ..., 18.
    long = [1.0, 1.2, 1.03, 1.2, 0.98, 1.2, 1.02, 1.2, 1.01, 1.2, 0.95, 1.2, 1.0, 1.2, 1.04, 1.2, 0.99, 1.2, 0.97]
    resampled = long[0::2]
    expected = hand_mask(resampled, STEPS, 0.08, 3, 0.2)
    assert expected != hand_mask(long[:STEPS], STEPS, 0.08, 3, 0.2)
    with dcache.accelerated(pipe, "magcache", mag_ratios=long, threshold=0.08, max_skip_steps=3):
        pipe(generator=gen(), **kw)
        got = masks(pipe, 2)
    assert got == [expected, expected]


def test_shipped_tables_and_resampling():
    from dcache.schedulers.magcache import load_table, nearest_resample

    flux = TABLES["FLUX.1-dev"]
    assert flux[:3] == ("flux", 28, False) and len(flux[3]) == 28 and flux[3][1] == 1.21094
    wan = load_table("Wan2.1-T2V-1.3B", False)
    assert len(wan.branches) == 2 and len(wan.branches[0]) == 50
    assert wan.branches[0][1] == 1.0124 and wan.branches[1][1] == 1.02213  # entries 2 and 3 of the table
    # 28 -> 50 steps: entry round(i * 27 / 49), ends kept
    r = nearest_resample(flux[3], 50)
    assert r[0] == flux[3][0] and r[-1] == flux[3][-1] and r[25] == flux[3][round(25 * 27 / 49)]


def test_calibration_measures_residual_norm_ratios(tmp_path):
    import tiny

    pipe, kw, attr, _ = tiny.flux(cfg=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(kw, num_inference_steps=6)
    tr = pipe.transformer
    first, last = tr.transformer_blocks[0], tr.single_transformer_blocks[-1]
    ins, outs = [], []
    h1 = first.register_forward_pre_hook(lambda m, a, k: ins.append(k.get("hidden_states", a[0] if a else None)),
                                         with_kwargs=True)
    h2 = last.register_forward_hook(lambda m, a, o: outs.append(o[1]))
    getattr(pipe(generator=gen(), **kw), attr)
    h1.remove()
    h2.remove()
    res = [o - i for i, o in zip(ins, outs)]
    hand = [1.0] + [float((res[t].norm(dim=-1) / res[t - 1].norm(dim=-1)).mean()) for t in range(1, len(res))]
    path = tmp_path / "ratios.json"
    with dcache.accelerated(pipe, "magcache", calibrate=True, calibration_file=str(path)):
        pipe(generator=gen(), **kw)
        assert pipe.dcache.stats()["reused"] == 0
    data = json.loads(path.read_text())
    assert data["steps"] == 6 and len(data["branches"]) == 1
    assert data["branches"][0] == pytest.approx(hand, rel=1e-5)
    # the file is a table
    with dcache.accelerated(pipe, "magcache", mag_ratios=str(path), threshold=10.0, max_skip_steps=1):
        pipe(generator=gen(), **kw)
        assert pipe.dcache.stats()["reused"] > 0


def test_clear_errors(tiny_pipes, tmp_path):
    flux = tiny_pipes("flux")[0]
    with pytest.raises(ValueError, match="no published ratio table.*calibrate=True"):
        dcache.accelerate(flux, "magcache")
    assert "dcache" not in flux.__dict__
    with pytest.raises(ValueError, match="magcache caches the residual of a transformer block chain"):
        dcache.accelerate(tiny_pipes("sd_unet")[0], "magcache", mag_ratios=[1.0, 1.0])
    with pytest.raises(ValueError, match="neither a shipped table"):
        dcache.accelerate(flux, "magcache", mag_ratios=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="mag_ratios must be a list of positive ratios"):
        dcache.accelerate(flux, "magcache", mag_ratios=[1.0, -2.0])
    with pytest.raises(ValueError, match="interleaved cond/uncond table needs an even length"):
        dcache.accelerate(flux, "magcache", mag_ratios=[1.0, 1.0, 1.0], interleaved=True)
    with pytest.raises(ValueError, match=r"retention_ratio must be in \[0.0, 1.0\]"):
        dcache.accelerate(flux, "magcache", mag_ratios=[1.0], retention_ratio=2)


def test_batched_cfg_uses_the_cond_table(tiny_pipes):
    """PixArt runs CFG as one batched call: one branch, decided by the cond entries."""
    pipe, kw, attr, _ = tiny_pipes("pixart")
    flat = [v for pair in zip(COND, UNCOND) for v in pair]
    with dcache.accelerated(pipe, "magcache", mag_ratios=flat, interleaved=True, threshold=0.1):
        pipe(generator=gen(), num_inference_steps=STEPS, **kw)
        got = masks(pipe, 2)
    assert got == [hand_mask(COND, STEPS, 0.1, 3, 0.2), []]




@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_adapter_skips_as_the_rule_says(family, tiny_pipes):
    """All ratios 1: error stays 0, so the cap K alone sets the mask; inner calls drop to match."""
    from test_adapters_policies import CallCounter

    pipe, kw, attr, inner = tiny_pipes(family)
    steps = 8
    c = CallCounter(inner)
    base = getattr(pipe(generator=gen(), num_inference_steps=steps, **kw), attr)
    base_calls, c.n = c.n, 0
    expected = hand_mask([1.0] * steps, steps, 0.06, 3, 0.2)  # steps 0, 1, 5 computed
    with dcache.accelerated(pipe, "magcache", mag_ratios=[1.0] * steps):
        out = getattr(pipe(generator=gen(), num_inference_steps=steps, **kw), attr)
        got = masks(pipe, 1)[0]
    calls = c.n
    c.remove()
    assert got == expected
    assert calls * steps == base_calls * sum(expected)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert torch.equal(getattr(pipe(generator=gen(), num_inference_steps=steps, **kw), attr), base)


def test_embedded_scenes_model_has_its_table():
    from dcache.pipelines.zoo.scenes import load_scenes_pipeline

    pipe = load_scenes_pipeline()
    with dcache.accelerated(pipe, "magcache"):
        table = pipe.dcache.targets[0].policies[0].table
        assert table.source.endswith("scenes_magcache.json")
        assert len(table.branches) == 2 and len(table.branches[0]) == 50 and table.branches[0][0] == 1.0
