"""Offloading stacked with dcache: diffusers' `enable_model_cpu_offload` (accelerate's
CpuOffload hooks on every component) and group offloading (diffusers' HookRegistry on every
block), each installed before and after `dcache.accelerate`.

This machine has no accelerator. `enable_model_cpu_offload()` refuses to run without one, but
`enable_model_cpu_offload(device="cpu")` installs the same hooks with cpu as the execution device;
group offloading runs with `onload_device=cpu` (its CUDA-stream prefetching needs a GPU and is
not exercised). The hooks fire on every call either way, and the test counts them firing.
"""

import pytest
import torch

import dcache
import tiny
from dcache.wrapper import Hook

STEPS = 4


def gen():
    return torch.Generator().manual_seed(0)


def run(pipe, kw, attr):
    return getattr(pipe(generator=gen(), num_inference_steps=STEPS, **kw), attr)


def _count_model_offload(pipe, counter):
    """Count the transformer's CpuOffload hook firing (accelerate calls ``_hf_hook.pre_forward``).
    The pipeline re-installs its offload hooks at the end of every call (``maybe_free_model_hooks``),
    so this arms the hook of the next call."""
    hook = pipe.transformer._hf_hook
    assert type(hook).__name__ == "CpuOffload"
    inner = hook.pre_forward

    def pre_forward(module, *args, **kwargs):
        counter["n"] += 1
        return inner(module, *args, **kwargs)

    hook.pre_forward = pre_forward


def _count_group_offload(pipe, counter):
    """Count onloads of the transformer's offload groups (the group hook calls ``group.onload_``)."""
    groups = {}
    for m in pipe.transformer.modules():
        registry = getattr(m, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            groups[id(hook.group)] = hook.group
    assert groups, "group offloading installed no hooks on the transformer"
    for group in groups.values():
        inner = group.onload_

        def onload_(inner=inner):
            counter["n"] += 1
            return inner()

        group.onload_ = onload_


def _offload(pipe, kind):
    if kind == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                  num_blocks_per_group=1)


def counted_run(pipe, kw, attr, kind):
    """(output, how many times the transformer's offload hooks fired during the call)."""
    counter = {"n": 0}
    (_count_model_offload if kind == "model" else _count_group_offload)(pipe, counter)
    return run(pipe, kw, attr), counter["n"]


OPTIONS = {"none": {}, "static": {"interval": 2, "warmup_steps": 1}}


@pytest.fixture(scope="module")
def references():
    """Outputs without offloading: the plain pipeline, and each policy on a fresh pipeline."""
    pipe, kw, attr, _ = tiny.build("flux_micro")
    out = {"plain": run(pipe, kw, attr)}
    for policy, opts in OPTIONS.items():
        with dcache.accelerated(pipe, policy, **opts):
            out[policy] = run(pipe, kw, attr)
            out[policy + "_reused"] = pipe.dcache.stats()["reused"]
    return out


@pytest.mark.parametrize("policy", list(OPTIONS))
@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("kind", ["model", "group"])
def test_offload_stacked_with_dcache(kind, order, policy, references):
    pipe, kw, attr, _ = tiny.build("flux_micro")
    if order == "before":
        _offload(pipe, kind)
    dcache.accelerate(pipe, policy, **OPTIONS[policy])
    if order == "after":
        _offload(pipe, kind)
    out, fired = counted_run(pipe, kw, attr, kind)
    stats = pipe.dcache.stats()
    assert fired > 0, "the offload hooks did not fire under dcache"
    # none: exactly the offloaded plain pipeline (which is the plain one); a caching policy:
    # exactly dcache without offloading, with the same reuse count.
    assert torch.equal(out, references[policy])
    assert stats["steps"] == STEPS and stats["reused"] == references[policy + "_reused"]
    if policy == "static":
        assert stats["reused"] > 0

    dcache.disable(pipe)
    out, fired = counted_run(pipe, kw, attr, kind)
    assert torch.equal(out, references["plain"])
    assert fired > 0, "dcache.disable removed the offload hooks"
    if kind == "model":
        assert type(pipe.transformer._hf_hook).__name__ == "CpuOffload"
    else:
        assert pipe.transformer.transformer_blocks[0]._diffusers_hook.get_hook("group_offloading") is not None
    assert not any(isinstance(m.__dict__.get("forward"), Hook) and m.__dict__["forward"].site is not None
                   for m in pipe.transformer.modules()), "a live dcache hook stayed behind"
    # Re-accelerating on top of the offload hooks works as the first time did.
    with dcache.accelerated(pipe, policy, **OPTIONS[policy]):
        assert torch.equal(run(pipe, kw, attr), references[policy])
