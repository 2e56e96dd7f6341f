"""DeepCache on tiny random-init SD- and SDXL-shaped UNets (real diffusers pipelines and schedulers).

Values are checked against the UNet's shallow path run by hand in this file (time embedding,
conv_in, the down blocks down to the branch, the up blocks from it with the deep feature captured
at the last full step, conv_out), schedules against the formula written out again below.
"""

import math

import numpy as np
import pytest
import torch

import dcache
from dcache.schedulers.deepcache import full_steps

STEPS = 7


# -- the independent computations ------------------------------------------------------------------
def expected_full(T, N, schedule="uniform", center=None, p=1.4):
    if schedule == "uniform":
        return [s for s in range(T) if s % N == 0]
    n = math.ceil(T / N)
    c = T // 2 if center is None else center
    while True:
        x = np.linspace(-(c ** (1 / p)), (T - c) ** (1 / p), n + 1)
        s = np.floor(c + np.sign(x) * np.abs(x) ** p + 0.5).astype(int)
        full = sorted({0} | {int(v) for v in s if 0 < v < T})
        if len(full) == n or p <= 1:
            return full
        p = max(p - 0.02, 1.0)


def embed(unet, sample, t, added=None):
    t = torch.as_tensor(t).reshape(-1).expand(sample.shape[0])
    emb = unet.time_embedding(unet.time_proj(t).to(sample.dtype))
    if added is not None:  # SDXL "text_time": pooled text + Fourier features of the size/crop ids
        tid = unet.add_time_proj(added["time_ids"].flatten()).reshape(sample.shape[0], -1)
        emb = emb + unet.add_embedding(torch.cat([added["text_embeds"], tid], dim=-1).to(emb.dtype))
    return emb


def shallow_forward(unet, sample, t, enc, feature, b, added=None):
    """The UNet with everything beneath branch ``b`` replaced by ``feature``."""
    emb = embed(unet, sample, t, added)
    h = unet.conv_in(sample)
    skips = [h]
    for blk in unet.down_blocks[: b + 1]:
        kw = dict(encoder_hidden_states=enc) if getattr(blk, "has_cross_attention", False) else {}
        h, res = blk(hidden_states=h, temb=emb, **kw)
        skips += list(res)
    # The deep up blocks consume more skips than the deep down blocks make: the rest are the
    # shallow blocks' last skips (SD's down block 0 downsampler output feeds up block L-2).
    L = len(unet.down_blocks)
    made = sum(len(d.resnets) + (d.downsamplers is not None) for d in unet.down_blocks[b + 1:])
    taken = sum(len(u.resnets) for u in unet.up_blocks[: L - 1 - b])
    skips = skips[: len(skips) - (taken - made)]
    h = feature
    for blk in unet.up_blocks[L - 1 - b:]:
        k = len(blk.resnets)
        res, skips = tuple(skips[-k:]), skips[:-k]
        kw = dict(encoder_hidden_states=enc) if getattr(blk, "has_cross_attention", False) else {}
        h = blk(hidden_states=h, temb=emb, res_hidden_states_tuple=res, **kw)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


# -- recording ---------------------------------------------------------------------------------------
class Recorder:
    """Every UNet call's inputs and output, and the hidden_states entering the branch's up block."""

    def __init__(self, unet, b):
        self.calls, self.features = [], []
        up = unet.up_blocks[len(unet.down_blocks) - 1 - b]
        self.handles = [
            unet.register_forward_pre_hook(self._inputs, with_kwargs=True),
            unet.register_forward_hook(self._output),
            up.register_forward_pre_hook(lambda m, a, kw: self.features.append(kw["hidden_states"].clone()),
                                         with_kwargs=True),
        ]

    def _inputs(self, m, args, kw):
        sample = kw.get("sample", args[0] if args else None)
        t = kw.get("timestep", args[1] if len(args) > 1 else None)
        self.calls.append(dict(sample=sample.clone(), t=torch.as_tensor(t).clone(),
                               enc=kw["encoder_hidden_states"].clone(), added=kw.get("added_cond_kwargs")))

    def _output(self, m, args, out):
        self.calls[-1]["out"] = (out[0] if isinstance(out, tuple) else out.sample).clone()

    def remove(self):
        for h in self.handles:
            h.remove()


def plain(unet, c):
    with torch.no_grad():
        return unet(c["sample"], c["t"], encoder_hidden_states=c["enc"], added_cond_kwargs=c["added"]).sample


def check_calls(unet, rec, full, b, branches=1):
    """Calls alternate over ``branches`` per step; cached calls equal the hand-run shallow path."""
    assert len(rec.calls) == len(rec.features) == STEPS * branches
    last = {}
    for i, c in enumerate(rec.calls):
        s, br = divmod(i, branches)
        with torch.no_grad():
            if s in full:
                last[br] = rec.features[i]
                torch.testing.assert_close(c["out"], plain(unet, c), rtol=0, atol=0)
            else:
                want = shallow_forward(unet, c["sample"], c["t"], c["enc"], last[br], b, c["added"])
                torch.testing.assert_close(c["out"], want, rtol=1e-6, atol=1e-6)
                # ... and the approximation is real: the full UNet gives something else here.
                assert not torch.allclose(c["out"], plain(unet, c), atol=1e-6)


def run(pipe, kw, steps=STEPS):
    return pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=steps, **kw).images


# -- an SDXL-shaped UNet (added text/time conditioning, 3 down blocks, 2-layer transformers) --------
def sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    import tiny

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1, 2), projection_class_embeddings_input_dim=16 + 6 * 8,
        cross_attention_dim=16, norm_num_groups=2).eval()
    vae = tiny.sd_unet()[0].vae
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, force_zeros_for_empty_prompt=False,
                                     scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                                      beta_schedule="scaled_linear"))
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 8, 16), pooled_prompt_embeds=torch.randn(1, 16),
              negative_prompt_embeds=torch.randn(1, 8, 16), negative_pooled_prompt_embeds=torch.randn(1, 16),
              height=32, width=32, guidance_scale=5.0, output_type="pt")
    return pipe, kw


@pytest.fixture(scope="module")
def sdxl_pipe():
    return sdxl()


# -- tests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [0, 1])
def test_sd_cached_steps_are_the_shallow_path_with_the_stored_deep_feature(tiny_pipes, b):
    pipe, kw, _, _ = tiny_pipes("sd_unet")
    unet = pipe.unet
    rec = Recorder(unet, b)
    try:
        with dcache.accelerated(pipe, "deepcache", cache_interval=3, cache_branch_id=b):
            run(pipe, kw)
            stats = pipe.dcache.stats()
    finally:
        rec.remove()
    full = expected_full(STEPS, 3)
    assert full == [0, 3, 6]
    check_calls(unet, rec, full, b)  # batched CFG: one call per step holds both halves
    assert stats["sites"][f"branch{b}"] == {"computed": 3, "reused": 4, "forecast": 0}


@pytest.mark.parametrize("b, deep, shallow", [(0, "down_blocks.1", "down_blocks.0"),
                                                (1, "mid_block", "down_blocks.1")])
def test_deep_modules_are_not_called_on_cached_steps(tiny_pipes, b, deep, shallow):
    pipe, kw, _, _ = tiny_pipes("sd_unet")
    unet = pipe.unet
    mods = dict(unet.named_modules())
    counts = {"deep": 0, "shallow": 0, "up0": 0}
    # Leaf layers inside the modules: they only run when their block really runs.
    hs = [mods[deep + ".resnets.0.conv1"].register_forward_hook(lambda *a: counts.__setitem__("deep", counts["deep"] + 1)),
          mods[shallow + ".resnets.0.conv1"].register_forward_hook(
              lambda *a: counts.__setitem__("shallow", counts["shallow"] + 1)),
          unet.up_blocks[0].resnets[0].conv1.register_forward_hook(
              lambda *a: counts.__setitem__("up0", counts["up0"] + 1))]
    try:
        with dcache.accelerated(pipe, "deepcache", cache_interval=3, cache_branch_id=b):
            run(pipe, kw)
    finally:
        for h in hs:
            h.remove()
    assert counts["deep"] == 3  # full steps 0, 3, 6 only
    assert counts["shallow"] == STEPS
    assert counts["up0"] == (3 if b == 0 else STEPS)  # up block 0 is deep for b = 0 only


@pytest.mark.parametrize("T, N, center", [(50, 3, None), (50, 5, 15), (20, 4, 5), (10, 3, 9), (12, 1, None)])
def test_schedules_match_the_formula(T, N, center):
    assert full_steps(T, N) == list(range(0, T, N))
    got = full_steps(T, N, "non-uniform", center)
    assert got == expected_full(T, N, "non-uniform", center)
    assert len(got) == math.ceil(T / N) and got[0] == 0 and len(set(got)) == len(got)


def test_non_uniform_is_densest_at_its_centre():
    got = full_steps(50, 3, "non-uniform", center=20, power=1.6)
    near = [s for s in got if abs(s - 20) <= 6]
    far = [s for s in got if s >= 40]
    assert len(near) > len(far) + 2


def test_non_uniform_schedule_drives_the_run(tiny_pipes):
    pipe, kw, _, _ = tiny_pipes("sd_unet")
    with dcache.accelerated(pipe, "deepcache", cache_interval=3, schedule="non-uniform", center=5):
        run(pipe, kw, steps=12)
        timeline = pipe.dcache.stats()["timeline"]
    computed = [e["step"] for e in timeline if e["sites"]["branch0"] == "computed"]
    assert computed == expected_full(12, 3, "non-uniform", 5)
    assert computed != expected_full(12, 3)


def test_sdxl_shaped_unet_with_added_conditioning(sdxl_pipe):
    pipe, kw = sdxl_pipe
    unet = pipe.unet
    rec = Recorder(unet, 1)
    try:
        with dcache.accelerated(pipe, "deepcache", cache_interval=2, cache_branch_id=1):
            run(pipe, kw)
    finally:
        rec.remove()
    assert rec.calls[0]["added"] is not None
    check_calls(unet, rec, expected_full(STEPS, 2), 1)


def test_two_denoiser_calls_per_step_keep_one_feature_per_branch(tiny_pipes):
    """cond and uncond run as separate UNet calls (a hand-written loop on the bare UNet): each
    cached call uses its own branch's feature, never the other's."""
    from diffusers import DDIMScheduler

    pipe, kw, _, _ = tiny_pipes("sd_unet")
    unet = pipe.unet
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    cond, uncond = kw["prompt_embeds"], kw["negative_prompt_embeds"]

    def loop():
        sched.set_timesteps(STEPS)
        x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t in sched.timesteps:
                ec = unet(x, t, encoder_hidden_states=cond).sample
                eu = unet(x, t, encoder_hidden_states=uncond).sample
                x = sched.step(eu + 5.0 * (ec - eu), t, x).prev_sample
        return x

    rec = Recorder(unet, 0)
    try:
        dcache.accelerate(unet, "deepcache", cache_interval=3)
        loop()
        assert unet.dcache.stats()["sites"]["branch0"] == {"computed": 6, "reused": 8, "forecast": 0}
    finally:
        dcache.disable(unet)
        rec.remove()
    assert not torch.allclose(rec.features[0], rec.features[1])  # a branch mix-up would show
    check_calls(unet, rec, expected_full(STEPS, 3), 0, branches=2)


def test_no_state_across_runs_and_disable_is_exact(tiny_pipes):
    pipe, kw, _, _ = tiny_pipes("sd_unet")
    base = run(pipe, kw)
    dcache.accelerate(pipe, "deepcache", cache_interval=2)
    try:
        a, sa = run(pipe, kw), pipe.dcache.stats()
        b, sb = run(pipe, kw), pipe.dcache.stats()
    finally:
        dcache.disable(pipe)
    assert torch.equal(a, b) and sa == sb
    assert not torch.equal(a, base)
    assert torch.equal(run(pipe, kw), base)


def test_refusals(tiny_pipes):
    flux, _, _, _ = tiny_pipes("flux")
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        dcache.accelerate(flux, "deepcache")
    sd, _, _, _ = tiny_pipes("sd_unet")
    with pytest.raises(ValueError, match=r"cache_branch_id must be in \[0, 1\]"):
        dcache.accelerate(sd, "deepcache", cache_branch_id=2)
    for bad in (dict(cache_interval=0), dict(schedule="quad"), dict(power=0.5), dict(center=-1)):
        with pytest.raises(ValueError, match="deepcache"):
            dcache.accelerate(sd, "deepcache", **bad)
    assert "dcache" not in sd.__dict__ and "forward" not in sd.unet.__dict__  # nothing left installed
