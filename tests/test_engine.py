"""Engine behaviour: branches, batch, step counts, bare models, memory."""

import gc
import weakref

import torch

import dcache


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sequential_cfg_keeps_branch_state_separate(tiny_pipes):
    """Wan calls the transformer twice per step (cond, uncond) with the same latents, and its
    timestep embedding does not depend on the text. A cache shared across branches (diffusers' PAB
    bug) would return the cond prediction for the uncond call on every reused step."""
    pipe, kw, attr, _ = tiny_pipes("wan")
    outs = []
    h = pipe.transformer.register_forward_hook(lambda m, a, o: outs.append(o[0].detach().clone()))
    dcache.accelerate(pipe, "static", interval=2, compute_last=False)
    try:
        pipe(generator=gen(), num_inference_steps=6, **kw)
        stats = pipe.dcache.stats()
    finally:
        dcache.disable(pipe)
        h.remove()
    assert stats["denoiser_calls"] == 12 and stats["steps"] == 6
    assert stats["reused"] == 3 * 2  # steps 1, 3, 5 in each branch
    for step in range(6):
        cond, uncond = outs[2 * step], outs[2 * step + 1]
        assert (cond - uncond).abs().max() > 1e-4, f"step {step}: uncond prediction is a copy of cond"


def test_batch_of_two_equals_two_single_runs(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    kw2 = dict(kw, prompt_embeds=kw["prompt_embeds"].repeat(2, 1, 1),
               pooled_prompt_embeds=kw["pooled_prompt_embeds"].repeat(2, 1))
    with dcache.accelerated(pipe, "taylorseer", interval=3, warmup_steps=1):
        both = getattr(pipe(generator=[gen(1), gen(2)], num_inference_steps=7, **kw2), attr)
        one = getattr(pipe(generator=gen(1), num_inference_steps=7, **kw), attr)
        two = getattr(pipe(generator=gen(2), num_inference_steps=7, **kw), attr)
    assert both.shape[0] == 2
    torch.testing.assert_close(both[0:1], one, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[1:2], two, atol=1e-5, rtol=1e-4)


def test_different_step_count_on_second_run(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    with dcache.accelerated(pipe, "taylorseer", interval=3, warmup_steps=1):
        pipe(generator=gen(), num_inference_steps=9, **kw)
        assert pipe.dcache.stats()["steps"] == 9
        second = getattr(pipe(generator=gen(), num_inference_steps=5, **kw), attr)
        assert pipe.dcache.stats()["steps"] == 5
    with dcache.accelerated(pipe, "taylorseer", interval=3, warmup_steps=1):
        fresh = getattr(pipe(generator=gen(), num_inference_steps=5, **kw), attr)
    assert torch.equal(second, fresh)


def test_cached_tensors_are_freed_when_the_run_ends(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    dcache.accelerate(pipe, "taylorseer", interval=3, warmup_steps=1)
    refs = []
    block = pipe.transformer.transformer_blocks[0]
    hook = block.register_forward_hook(
        lambda *a: refs.extend(weakref.ref(s.terms) for e in pipe.dcache.run.cache.values()
                               for s in getattr(e, "states", []) if s is not None and s.terms is not None))
    try:
        pipe(generator=gen(), num_inference_steps=6, **kw)
        hook.remove()
        gc.collect()
        assert pipe.dcache.run is None and pipe.dcache.stats()["cache_bytes"] == 0
        assert pipe.dcache.stats()["peak_cache_bytes"] > 0
    finally:
        dcache.disable(pipe)
    gc.collect()
    assert refs, "the run cached no Taylor history to check"
    assert all(r() is None for r in refs), "a Taylor history outlived its run"


def test_exception_mid_run_does_not_leak_state(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    def boom(p, i, t, cbk):
        if i == 2:
            raise RuntimeError("interrupted")
        return cbk

    with dcache.accelerated(pipe, "static", interval=2):
        try:
            pipe(generator=gen(), num_inference_steps=6, callback_on_step_end=boom, **kw)
        except RuntimeError:
            pass
        assert pipe.dcache.run is None
        after = getattr(pipe(generator=gen(), num_inference_steps=6, **kw), attr)
    with dcache.accelerated(pipe, "static", interval=2):
        base_pipe_out = getattr(pipe(generator=gen(), num_inference_steps=6, **kw), attr)
    assert torch.equal(after, base_pipe_out)


def test_bare_model_detects_new_trajectory_and_reset(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    model = pipe.transformer
    torch.manual_seed(0)
    x = torch.randn(1, 64, 4)
    enc = torch.randn(1, 8, 32)
    pooled = torch.randn(1, 32)
    ids_img, ids_txt = torch.zeros(64, 3), torch.zeros(8, 3)

    def trajectory():
        lat = x.clone()
        outs = []
        for t in torch.linspace(1.0, 0.1, 6):
            o = model(hidden_states=lat, encoder_hidden_states=enc, pooled_projections=pooled,
                      timestep=t.reshape(1), img_ids=ids_img, txt_ids=ids_txt, return_dict=False)[0]
            lat = lat - 0.15 * o
            outs.append(o)
        return torch.stack(outs)

    dcache.accelerate(model, "static", interval=2)
    try:
        a = trajectory()
        assert model.dcache.stats()["reused"] > 0
        b = trajectory()  # timestep jumps back up: a new run, no stale residuals
        model.dcache.reset()
        assert model.dcache.run is None
        c = trajectory()
    finally:
        dcache.disable(model)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert "dcache" not in model.__dict__ and "forward" not in model.__dict__
