"""Invisible when idle, and removable alone: what a plain model does, an accelerated one does.

SD3 skip_layers, re-entrant gradient checkpointing, copy.deepcopy, torch.save, accelerate's and
diffusers' own hooks installed before and after dcache, and the install-time refusals.
"""

import copy
import io

import pytest
import torch

import dcache
from dcache.wrapper import Hook


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def flux_inputs(batch=1):
    torch.manual_seed(0)
    return dict(hidden_states=torch.randn(batch, 64, 4), encoder_hidden_states=torch.randn(batch, 8, 32),
                pooled_projections=torch.randn(batch, 32), timestep=torch.full((batch,), 0.5),
                img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3), return_dict=False)


def sd3_inputs():
    torch.manual_seed(0)
    return dict(hidden_states=torch.randn(2, 4, 4, 4), encoder_hidden_states=torch.randn(2, 8, 32),
                pooled_projections=torch.randn(2, 64), timestep=torch.tensor([500.0, 500.0]), return_dict=False)


@pytest.mark.parametrize("policy", ["none", "static", "fbcache", "taylorseer"])
def test_sd3_skip_layers(policy, tiny_pipes):
    """Skip-layer guidance never calls block 0 (or others): the chain hook must not depend on it."""
    model = tiny_pipes("sd3")[0].transformer
    plain = [model(**sd3_inputs(), skip_layers=skip)[0] for skip in ([0], [1], None)]
    opts = {"static": {"interval": 2}, "fbcache": {"threshold": 1e6}, "taylorseer": {"interval": 2}}.get(policy, {})
    dcache.accelerate(model, policy, **opts)
    try:
        got = [model(**sd3_inputs(), skip_layers=skip)[0] for skip in ([0], [1], None)]
    finally:
        dcache.disable(model)
    # Each call is a new trajectory step for a bare model; the first of each kind computes.
    torch.testing.assert_close(got[0], plain[0], atol=0, rtol=0)
    if policy == "none":
        for g, p in zip(got, plain):
            assert torch.equal(g, p)


def test_reentrant_gradient_checkpointing_with_none(tiny_pipes):
    import functools

    import torch.utils.checkpoint as ckpt

    model = copy.deepcopy(tiny_pipes("flux")[0].transformer)
    model.train()
    model.enable_gradient_checkpointing(functools.partial(ckpt.checkpoint, use_reentrant=True))

    def grads():
        model.zero_grad()
        inp = flux_inputs()
        inp["hidden_states"].requires_grad_(True)
        model(**inp)[0].square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], inp["hidden_states"].grad

    plain, plain_x = grads()
    dcache.accelerate(model, "none")
    try:
        got, got_x = grads()
        stats = model.dcache.stats()
    finally:
        dcache.disable(model)
    assert torch.equal(got_x, plain_x) and all(torch.equal(a, b) for a, b in zip(got, plain))
    # The backward pass re-runs every block; those re-runs are not new denoiser calls or sites.
    assert stats["denoiser_calls"] == 1 and stats["computed"] == 1


def test_deepcopy_computes_with_its_own_weights_and_can_be_disabled(tiny_pipes):
    model = tiny_pipes("flux")[0].transformer
    dcache.accelerate(model, "static", interval=2)
    try:
        twin = copy.deepcopy(model)
    finally:
        dcache.disable(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    plain_twin = copy.deepcopy(twin)
    dcache.disable(plain_twin)
    assert torch.equal(twin(**flux_inputs())[0], type(twin).forward(twin, **flux_inputs())[0])
    assert not torch.equal(twin(**flux_inputs())[0], model(**flux_inputs())[0])
    assert twin.dcache.stats() == {}
    dcache.disable(twin)
    assert "forward" not in twin.__dict__ and "dcache" not in twin.__dict__
    assert all("forward" not in m.__dict__ for m in twin.modules())
    # Re-accelerating the copy works like on any model.
    with dcache.accelerated(twin, "static", interval=2):
        twin(**flux_inputs())
        assert twin.dcache.stats()["denoiser_calls"] == 1


def test_torch_save_and_load(tiny_pipes):
    model = tiny_pipes("flux")[0].transformer
    expected = model(**flux_inputs())[0]
    dcache.accelerate(model, "taylorseer", interval=2)
    try:
        buf = io.BytesIO()
        torch.save(model, buf)
    finally:
        dcache.disable(model)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(**flux_inputs())[0], expected)
    dcache.disable(loaded)
    assert all("forward" not in m.__dict__ for m in loaded.modules())


class Counting:
    """A diffusers ModelHook that counts the calls it sees."""

    def __new__(cls):
        from diffusers.hooks import ModelHook

        class _Hook(ModelHook):
            def __init__(self):
                super().__init__()
                self.n = 0

            def pre_forward(self, module, *args, **kwargs):
                self.n += 1
                return args, kwargs

        return _Hook()


@pytest.mark.parametrize("order", ["before", "after"])
def test_diffusers_hook_registry_survives_disable(order, tiny_pipes):
    from diffusers.hooks import HookRegistry

    pipe, kw, attr, _ = tiny_pipes("flux")
    base = getattr(pipe(generator=gen(), num_inference_steps=3, **kw), attr)
    hook = Counting()
    block = pipe.transformer.transformer_blocks[0]
    registry = HookRegistry.check_if_exists_or_initialize(block)
    if order == "before":
        registry.register_hook(hook, "counting")
    dcache.accelerate(pipe, "static", interval=2)
    if order == "after":
        registry.register_hook(hook, "counting")
    getattr(pipe(generator=gen(), num_inference_steps=3, **kw), attr)
    during = hook.n
    dcache.disable(pipe)
    out = getattr(pipe(generator=gen(), num_inference_steps=3, **kw), attr)
    after = hook.n - during
    registry.remove_hook("counting")
    # Inside dcache's layer the block is skipped on the reused step; outside it, it always fires.
    assert during == (2 if order == "before" else 3) and after == 3, "diffusers' hook stopped firing"
    assert torch.equal(out, base)
    assert getattr(pipe(generator=gen(), num_inference_steps=3, **kw), attr).equal(base)


@pytest.mark.parametrize("order", ["before", "after"])
def test_accelerate_offload_hooks_survive_disable(order, tiny_pipes):
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Count(ModelHook):
        n = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.n += 1
            return args, kwargs

    pipe, kw, attr, _ = tiny_pipes("flux")
    tr = pipe.transformer
    base = getattr(pipe(generator=gen(), num_inference_steps=3, **kw), attr)
    if order == "before":
        add_hook_to_module(tr, Count())
    dcache.accelerate(pipe, "static", interval=2)
    if order == "after":
        add_hook_to_module(tr, Count())
    pipe(generator=gen(), num_inference_steps=3, **kw)
    assert pipe.dcache.stats()["reused"] == 1
    dcache.disable(pipe)
    Count.n = 0
    out = getattr(pipe(generator=gen(), num_inference_steps=3, **kw), attr)
    assert Count.n == 3, "accelerate's hook was removed with dcache"
    remove_hook_from_module(tr)
    assert torch.equal(out, base)
    assert torch.equal(getattr(pipe(generator=gen(), num_inference_steps=3, **kw), attr), base)
    # (accelerate itself leaves the bound class forward as an instance attribute)
    assert not isinstance(tr.__dict__.get("forward"), Hook), "a dcache layer stayed behind"
    tr.__dict__.pop("forward", None)  # leave the shared tiny model as it was built
    tr.__dict__.pop("_old_forward", None)


def test_diffusers_own_cache_on_the_denoiser_is_refused(tiny_pipes):
    from diffusers import FirstBlockCacheConfig

    pipe = tiny_pipes("flux")[0]
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    try:
        with pytest.raises(ValueError, match="diffusers' own cache enabled.*FirstBlockCacheConfig.*disable_cache"):
            dcache.accelerate(pipe, "fbcache")
        assert "dcache" not in pipe.__dict__
    finally:
        pipe.transformer.disable_cache()


def test_unknown_granularity_and_zero_sites_are_refused(tiny_pipes):
    from dataclasses import dataclass

    from dcache.registry import _POLICIES, register_policy
    from dcache.schedulers._base import ModulePolicy, Policy

    class Odd(Policy):
        granularity = "voxel"

    @register_policy("test-odd", description="a granularity nobody installs", granularity="voxel")
    @dataclass
    class OddConfig:
        def build(self, env):
            return Odd()

    class NoSites(ModulePolicy):
        pass

    @register_policy("test-nosites", description="hooks nothing", granularity="module")
    @dataclass
    class NoSitesConfig:
        def build(self, env):
            return NoSites()

    pipe = tiny_pipes("flux")[0]
    try:
        with pytest.raises(ValueError, match="'test-odd' has granularity 'voxel'.*known: .*block.*guidance.*module.*step"):
            dcache.accelerate(pipe, "test-odd")
        assert "dcache" not in pipe.__dict__
        from dcache.pipelines.adapters import flux

        adapter = flux.make()
        spec = adapter.block_specs
        saved = dict(spec)
        for k, v in saved.items():
            spec[k] = type(v)(encoder=v.encoder, returns=v.returns, sites=(), feeders=())
        import dcache.pipelines.adapters as ad

        real = ad._FACTORIES["FluxTransformer2DModel"]
        ad._FACTORIES["FluxTransformer2DModel"] = lambda: adapter
        try:
            with pytest.raises(ValueError, match="'test-nosites' hooked 0 sites on FluxTransformer2DModel"):
                dcache.accelerate(pipe, "test-nosites")
        finally:
            ad._FACTORIES["FluxTransformer2DModel"] = real
        assert "dcache" not in pipe.__dict__
        assert not any(isinstance(m.__dict__.get("forward"), Hook) for m in pipe.transformer.modules())
    finally:
        _POLICIES.pop("test-odd", None)
        _POLICIES.pop("test-nosites", None)
