"""Step bookkeeping comes from the loop: each failure of the timestep-equality scheme reproduced.

Per-token timesteps, img2img strength, Heun's repeated timesteps, a bare model with increasing
timesteps, a batch that changes mid-run (dynamic CFG), and Wan 2.2's second expert.
"""

import pytest
import torch

import dcache


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class CallCounter:
    def __init__(self, module):
        self.n = 0
        self.h = module.register_forward_hook(self._hook)

    def _hook(self, *a):
        self.n += 1

    def remove(self):
        self.h.remove()


def test_wan22_second_expert_is_hooked_with_its_own_state(tiny_pipes):
    pipe, kw, attr, inner2 = tiny_pipes("wan22")
    c = CallCounter(inner2)
    base = getattr(pipe(generator=gen(), num_inference_steps=6, **kw), attr)
    plain_calls = c.n
    c.n = 0
    dcache.accelerate(pipe, "static", interval=2, warmup_steps=1, compute_last=False)
    try:
        getattr(pipe(generator=gen(), num_inference_steps=6, **kw), attr)
        stats = pipe.dcache.stats()
    finally:
        dcache.disable(pipe)
    calls = c.n
    c.remove()
    assert stats["steps"] == 6 and stats["denoiser_calls"] == 12
    second = [e for e in stats["timeline"] if "transformer_2:blocks[0:3]" in e["sites"]]
    first = [e for e in stats["timeline"] if "blocks[0:3]" in e["sites"]]
    assert second and first and len(first) + len(second) == 12
    # Its first call in each branch has nothing of its own cached: computed, never the other
    # expert's residual.
    for branch in (0, 1):
        e = next(e for e in second if e["branch"] == branch)
        assert e["sites"]["transformer_2:blocks[0:3]"] == "computed"
    assert any(v == "reused" for e in second for v in e["sites"].values())
    assert calls < plain_calls, "transformer_2's blocks were never skipped"
    assert torch.equal(getattr(pipe(generator=gen(), num_inference_steps=6, **kw), attr), base)


def test_per_token_timesteps_on_a_bare_model(tiny_pipes):
    """Wan 2.2 TI2V / LTX i2v give conditioning tokens t = 0: the first element is 0 every step."""
    pipe = tiny_pipes("wan")[0]
    model = pipe.transformer
    torch.manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4)
    enc = torch.randn(1, 16, 32)
    tokens = 2 * 2 * 2

    def trajectory():
        lat, outs = x.clone(), []
        for t in torch.linspace(900, 100, 6):
            ts = torch.full((1, tokens), float(t))
            ts[:, : tokens // 2] = 0  # the first latent frame is the clean conditioning image
            o = model(hidden_states=lat, timestep=ts, encoder_hidden_states=enc, return_dict=False)[0]
            lat = lat - 0.1 * o
            outs.append(o)
        return torch.stack(outs)

    dcache.accelerate(model, "static", interval=2)
    try:
        a = trajectory()
        stats = model.dcache.stats()
        b = trajectory()
    finally:
        dcache.disable(model)
    assert stats["steps"] == 6 and {e["branch"] for e in stats["timeline"]} == {0}
    assert stats["reused"] == 3
    assert torch.equal(a, b)


def _sd_img2img(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(**pipe.components)


def test_strength_below_one_counts_the_loop_and_computes_its_last_step(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("sd_unet")
    i2i = _sd_img2img(pipe)
    i2i.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=gen(3))
    kw = {k: v for k, v in kw.items() if k not in ("height", "width")}
    with dcache.accelerated(i2i, "static", interval=100, warmup_steps=1, compute_last=True):
        i2i(image=image, strength=0.5, num_inference_steps=8, generator=gen(), **kw)
        stats = i2i.dcache.stats()
    kinds = [e["sites"]["model"] for e in stats["timeline"]]
    assert stats["steps"] == 4
    assert kinds == ["computed", "reused", "reused", "computed"]


def test_heun_repeated_timesteps_are_one_step_not_a_branch(tiny_pipes):
    from diffusers import HeunDiscreteScheduler

    pipe, kw, attr, _ = tiny_pipes("sd_unet")
    saved = pipe.scheduler
    pipe.scheduler = HeunDiscreteScheduler.from_config(saved.config)
    try:
        with dcache.accelerated(pipe, "static", interval=2, warmup_steps=1, compute_last=False):
            pipe(generator=gen(), num_inference_steps=4, **kw)
            stats = pipe.dcache.stats()
    finally:
        pipe.scheduler = saved
    tl = stats["timeline"]
    assert stats["steps"] == 4 and stats["denoiser_calls"] == 7
    assert [e["step"] for e in tl] == [0, 1, 1, 2, 2, 3, 3]
    assert {e["branch"] for e in tl} == {0}
    # One decision per step, shared by the predictor and corrector calls.
    assert [e["sites"]["model"] for e in tl] == ["computed", "reused", "reused", "computed", "computed",
                                                 "reused", "reused"]


def test_bare_model_with_increasing_timesteps_caches(tiny_pipes):
    pipe = tiny_pipes("flux")[0]
    model = pipe.transformer
    torch.manual_seed(0)
    x, enc, pooled = torch.randn(1, 64, 4), torch.randn(1, 8, 32), torch.randn(1, 32)
    ids_img, ids_txt = torch.zeros(64, 3), torch.zeros(8, 3)

    def trajectory():
        lat, outs = x.clone(), []
        for t in torch.linspace(0.1, 1.0, 6):  # t = 0 is noise in this convention
            o = model(hidden_states=lat, encoder_hidden_states=enc, pooled_projections=pooled,
                      timestep=t.reshape(1), img_ids=ids_img, txt_ids=ids_txt, return_dict=False)[0]
            lat = lat + 0.15 * o
            outs.append(o)
        return torch.stack(outs)

    dcache.accelerate(model, "static", interval=2)
    try:
        a = trajectory()
        stats = model.dcache.stats()
        b = trajectory()  # goes back down: a new generation
    finally:
        dcache.disable(model)
    assert stats["steps"] == 6 and stats["reused"] == 3
    assert torch.equal(a, b)


def _drop_uncond_at(step):
    def callback(pipe, i, t, cbk):
        if i == step:
            pipe._guidance_scale = 0.0
            for k in list(cbk):
                if k != "latents":
                    cbk[k] = cbk[k].chunk(2)[-1]
        return cbk

    return callback


@pytest.mark.parametrize("family, policy, options, inputs", [
    ("sd3", "taylorseer", {"interval": 3, "warmup_steps": 1}, ["prompt_embeds", "pooled_prompt_embeds"]),
    ("sd3", "static", {"interval": 3}, ["prompt_embeds", "pooled_prompt_embeds"]),
    ("sd3", "static", {"interval": 3, "residual_order": 1, "difference_from": 0}, ["prompt_embeds", "pooled_prompt_embeds"]),
    ("sd_unet", "static", {"interval": 3}, ["prompt_embeds"]),
])
def test_batch_change_mid_run_computes_and_reseeds(family, policy, options, inputs, tiny_pipes):
    """diffusers' documented dynamic CFG: after step 1 the uncond half is dropped (batch 2 -> 1).
    Step 2 is a reuse/forecast step of the schedule; with the stale batch the pipeline returned 2
    images (transformers) or crashed (UNet)."""
    pipe, kw, attr, _ = tiny_pipes(family)
    with dcache.accelerated(pipe, policy, **options):
        out = getattr(pipe(generator=gen(), num_inference_steps=6, callback_on_step_end=_drop_uncond_at(1),
                           callback_on_step_end_tensor_inputs=inputs, **kw), attr)
        stats = pipe.dcache.stats()
    assert out.shape[0] == 1 and torch.isfinite(out).all()
    at_switch = stats["timeline"][2]
    assert at_switch["sites"] and set(at_switch["sites"].values()) == {"computed"}
    assert any(v != "computed" for e in stats["timeline"][3:] for v in e["sites"].values())


def test_teacache_on_hunyuan_video_token_replace_blocks():
    """HunyuanVideo image-to-video builds token-replace blocks, whose norm1 takes the first
    frame's own modulation: the TeaCache probe crashed on them."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                           num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=1,
                                           patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                           pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
                                           image_condition_type="token_replace").eval()
    assert type(model.transformer_blocks[0]).__name__ == "HunyuanVideoTokenReplaceTransformerBlock"
    x = torch.randn(1, 4, 2, 4, 4)
    common = dict(encoder_hidden_states=torch.randn(1, 8, 16), encoder_attention_mask=torch.ones(1, 8),
                  pooled_projections=torch.randn(1, 8), guidance=torch.tensor([6000.0]), return_dict=False)
    probe = model.transformer_blocks[0].norm1
    seen = []
    h = probe.register_forward_hook(lambda m, a, o: seen.append(o[0].detach().clone()))

    def run():
        outs = []
        with torch.no_grad():
            for t in (900.0, 800.0, 700.0, 600.0):
                outs.append(model(hidden_states=x, timestep=torch.tensor([t]), **common)[0])
        return outs

    plain = run()
    plain_probes, seen[:] = list(seen), []
    try:
        with dcache.accelerated(model, "teacache", threshold=1e6, coefficients=[1.0, 0.0], compute_last=False):
            got = run()
            stats = model.dcache.stats()
    finally:
        h.remove()
    assert stats["reused"] == 3 and torch.equal(got[0], plain[0])
    # The probe is the block's own token-replace modulated input: computed once per call by the
    # adapter (the block's norm1 call), equal to the plain model's at the same step.
    assert torch.equal(seen[0], plain_probes[0])
