"""Loops the engine must count right: SDXL's base -> refiner cut (`denoising_end` /
`denoising_start`), and pipelines that never call `scheduler.step()` (their own solver).

The loop's real length is counted independently: by `callback_on_step_end` calls for diffusers
pipelines, by the loop's own counter for the hand-written one.
"""

import copy

import pytest
import torch
from diffusers import DiffusionPipeline

import dcache


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _sdxl():
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    torch.manual_seed(0)
    # SDXL's added conditioning: 6 time ids x 8 + a pooled text embedding of 16.
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 16,
                                cross_attention_dim=16, norm_num_groups=2).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading", steps_offset=1)
    base = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=sched, force_zeros_for_empty_prompt=False)
    # The refiner has a UNet of its own (in SDXL a different model; here a copy).
    refiner = StableDiffusionXLImg2ImgPipeline(**dict(base.components, unet=copy.deepcopy(unet)),
                                               requires_aesthetics_score=False)
    for p in (base, refiner):
        p.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 77, 16), pooled_prompt_embeds=torch.randn(1, 16),
              negative_prompt_embeds=torch.randn(1, 77, 16), negative_pooled_prompt_embeds=torch.randn(1, 16),
              height=32, width=32, guidance_scale=5.0)
    return base, refiner, kw


class StepCounter:
    """callback_on_step_end: called once per executed loop step, by the pipeline itself."""

    def __init__(self):
        self.n = 0

    def __call__(self, pipe, i, t, cbk):
        self.n += 1
        return cbk


@pytest.mark.parametrize("policy, options", [
    ("static", {"interval": 100, "warmup_steps": 1, "compute_last": True}),
    ("teacache", {"threshold": 1e6, "coefficients": [1.0, 0.0], "compute_last": True}),
])
def test_sdxl_denoising_end_then_refiner_computes_each_cut_loops_last_step(policy, options):
    base, refiner, kw = _sdxl()
    seen = {}
    with dcache.accelerated(base, policy, **options), dcache.accelerated(refiner, policy, **options):
        for name, pipe, extra in (("base", base, dict(denoising_end=0.6, output_type="latent")),
                                  ("refiner", refiner, dict(denoising_start=0.6, output_type="pt"))):
            counter = StepCounter()
            if name == "refiner":
                extra["image"] = latents
            out = pipe(num_inference_steps=10, generator=gen(), callback_on_step_end=counter, **extra, **kw).images
            if name == "base":
                latents = out
            seen[name] = (counter.n, pipe.dcache.stats())
    for name, (loop_len, stats) in seen.items():
        kinds = [e["sites"]["model"] for e in stats["timeline"]]
        assert 0 < loop_len < 10, (name, loop_len)
        assert stats["steps"] == loop_len and len(kinds) == loop_len, name
        # The first step warms up, the last executed step of the cut loop computes, the rest reuse.
        assert kinds == ["computed"] + ["reused"] * (loop_len - 2) + ["computed"], (name, kinds)
    assert seen["base"][0] + seen["refiner"][0] == 10


def test_sdxl_img2img_strength_last_step_computes():
    _, refiner, kw = _sdxl()
    image = torch.rand(1, 3, 32, 32, generator=gen(3))
    counter = StepCounter()
    with dcache.accelerated(refiner, "static", interval=100, warmup_steps=1, compute_last=True):
        refiner(image=image, strength=0.3, num_inference_steps=10, generator=gen(), callback_on_step_end=counter,
                output_type="pt", **kw)
        stats = refiner.dcache.stats()
    kinds = [e["sites"]["model"] for e in stats["timeline"]]
    assert counter.n == 3 and stats["steps"] == 3
    assert kinds == ["computed", "reused", "computed"]


class OwnSolverPipeline(DiffusionPipeline):
    """A pipeline with its own flow-matching Euler loop: it sets the scheduler's sigmas but never
    calls ``scheduler.step()``, and runs guidance as two separate denoiser calls per step."""

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, latents, cond, uncond, pooled, num_inference_steps=6, scale=3.0):
        self.scheduler.set_timesteps(num_inference_steps)
        sigmas = self.scheduler.sigmas
        ids_img, ids_txt = torch.zeros(latents.shape[1], 3), torch.zeros(cond.shape[1], 3)
        self.executed = 0
        for i, t in enumerate(self.scheduler.timesteps):
            ts = (t / 1000).reshape(1)
            common = dict(hidden_states=latents, pooled_projections=pooled, timestep=ts, img_ids=ids_img,
                          txt_ids=ids_txt, return_dict=False)
            v_c = self.transformer(encoder_hidden_states=cond, **common)[0]
            v_u = self.transformer(encoder_hidden_states=uncond, **common)[0]
            v = v_u + scale * (v_c - v_u)
            latents = latents + (sigmas[i + 1] - sigmas[i]) * v
            self.executed += 1
        return latents


def _own_solver(tiny_pipes):
    from diffusers import FlowMatchEulerDiscreteScheduler

    tr = tiny_pipes("flux")[0].transformer
    pipe = OwnSolverPipeline(tr, FlowMatchEulerDiscreteScheduler())
    torch.manual_seed(0)
    inputs = dict(latents=torch.randn(1, 64, 4), cond=torch.randn(1, 8, 32), uncond=torch.randn(1, 8, 32),
                  pooled=torch.randn(1, 32))
    return pipe, inputs


def test_a_loop_without_scheduler_step_counts_steps_and_branches(tiny_pipes):
    pipe, inputs = _own_solver(tiny_pipes)
    plain = pipe(**inputs)
    with dcache.accelerated(pipe, "none"):
        assert torch.equal(pipe(**inputs), plain)
    with dcache.accelerated(pipe, "static", interval=2, warmup_steps=1, compute_last=True):
        cached = pipe(**inputs)
        stats = pipe.dcache.stats()
    tl = stats["timeline"]
    assert stats["steps"] == pipe.executed == 6 and stats["denoiser_calls"] == 12
    assert [e["step"] for e in tl] == [s for s in range(6) for _ in (0, 1)]
    assert [e["branch"] for e in tl] == [0, 1] * 6
    # static interval 2 after one warm-up step, last step computed: one decision per step,
    # shared by both branches.
    site = "blocks[0:4]"
    kinds = [e["sites"][site] for e in tl]
    assert kinds == [k for k in ["computed", "reused", "computed", "reused", "computed", "computed"] for _ in (0, 1)]
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()


def test_a_loop_without_scheduler_step_with_a_data_dependent_policy(tiny_pipes):
    """FBCache with an infinite threshold and at most 2 reused steps in a row: the cap counts loop
    steps, so both branches of a step share the decision and the pattern is per step."""
    pipe, inputs = _own_solver(tiny_pipes)
    with dcache.accelerated(pipe, "fbcache", threshold=1e6, warmup_steps=1, max_consecutive=2):
        pipe(**inputs)
        stats = pipe.dcache.stats()
    assert stats["steps"] == 6 and stats["denoiser_calls"] == 12
    per_step = {}
    for e in stats["timeline"]:
        per_step.setdefault(e["step"], []).append({v for k, v in e["sites"].items() if k != "blocks[0:1]"})
    assert [per_step[s] for s in range(6)] == [[{k}, {k}] for k in
                                               ("computed", "reused", "reused", "computed", "reused", "reused")]
