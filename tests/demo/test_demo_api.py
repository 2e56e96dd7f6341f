"""The demo through its real Gradio server (gradio_client): isolation, errors, the dLLM and video tabs."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from demo_checks import as_uint8, expected_timeline, number_after, parse_timeline, require, shown_pixels

require("gradio")


def widget_values(task: str, policy: str, overrides: dict) -> list:
    """Every policy's knob widgets in page order, at their start values, the chosen one's overridden."""
    from dcache.demos.knobs import display_default, policy_knobs

    values = []
    for name, ks in policy_knobs(task).items():
        for k in ks:
            values.append(overrides.get(k.name, display_default(k)) if name == policy else display_default(k))
    return values


def image_args(policy: str, overrides: dict | None = None, label: str = "3", seed: int = 0, steps: int = 10,
               path: str = "", guidance: float = 4.0, spec: str = "") -> list:
    return ["digits", path, label, seed, steps, guidance, policy, spec, *widget_values("image", policy, overrides or {})]


def test_two_concurrent_requests_get_their_own_results(client, digits_direct):
    """Two requests with different policies run at the same time, each on its own instance; each shows
    exactly what that policy gives alone on a fresh pipeline."""
    from dcache.demos import image_task

    image_task.get_model("digits").pool.peak_in_use = 0
    reqs = {"static": ({"interval": 2}, 11), "taylorseer": ({"interval": 3, "warmup_steps": 2}, 12)}
    jobs = {p: client.submit(*image_args(p, o, seed=seed, steps=16), api_name="/generate_image")
            for p, (o, seed) in reqs.items()}
    results = {p: j.result(timeout=300) for p, j in jobs.items()}
    # Two instances were out at once: the requests really overlapped.
    assert image_task.get_model("digits").pool.peak_in_use >= 2
    for policy, (opts, seed) in reqs.items():
        status, base_path, acc_path, _, metrics, _, tl_text = results[policy]
        assert status == "done", status
        want_acc, stats = digits_direct(policy, opts, 3, seed, 16)
        want_base, _ = digits_direct(None, {}, 3, seed, 16)
        assert np.abs(shown_pixels(Image.open(acc_path), 32).astype(int) - as_uint8(want_acc)).max() <= 1
        assert np.abs(shown_pixels(Image.open(base_path), 32).astype(int) - as_uint8(want_base)).max() <= 1
        assert parse_timeline(tl_text) == expected_timeline(stats)
        assert f"· {policy} " in metrics
        # FLOP accounting too: a table measured while the other request ran would differ
        assert number_after(metrics, "FLOPs computed:") == pytest.approx(1 - stats["flops_avoided_fraction"], abs=6e-4)


def test_baseline_is_cached_per_model_condition_seed_steps(client):
    first = client.predict(*image_args("static", seed=21, steps=6), api_name="/generate_image")
    again = client.predict(*image_args("taylorseer", seed=21, steps=6), api_name="/generate_image")
    other = client.predict(*image_args("taylorseer", seed=22, steps=6), api_name="/generate_image")
    assert "(cached)" not in first[4] and "(cached)" in again[4] and "(cached)" not in other[4]
    # the cached baseline is the same image, and its wall time is the one measured first
    assert np.array_equal(np.asarray(Image.open(first[1])), np.asarray(Image.open(again[1])))
    assert number_after(first[4], "wall time: baseline") == number_after(again[4], "wall time: baseline")


def _unsupported_pipeline(path: str) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(path)


@pytest.mark.parametrize("case", ["bad-path", "unsupported", "bad-option", "bad-type", "bad-class", "bad-steps"])
def test_errors_are_messages_and_the_app_lives_on(client, tmp_path, case):
    if case == "unsupported":
        _unsupported_pipeline(str(tmp_path / "ddpm"))
    args = {
        "bad-path": image_args("static", path=str(tmp_path / "missing")),
        "unsupported": image_args("static", path=str(tmp_path / "ddpm")),
        "bad-option": image_args("static", {"interval": 0}),
        "bad-type": image_args("taylorseer", {"dtype": "float77"}),
        "bad-class": image_args("static", label="12"),
        "bad-steps": image_args("static", steps=1),
    }[case]
    want = {"bad-path": "cannot load a diffusers pipeline", "unsupported": "unsupported model class UNet2DModel",
            "bad-option": "interval must be", "bad-type": "dtype", "bad-class": "class label 0-9",
            "bad-steps": "steps must be"}[case]
    out = client.predict(*args, api_name="/generate_image")
    assert out[0].startswith("**Error:**") and want in out[0], out[0]
    assert all(o is None for o in out[1:])
    ok = client.predict(*image_args("static", steps=4), api_name="/generate_image")
    assert ok[0] == "done"


def test_dllm_tab_streams_the_answer_filling_in(client):
    from dcache.demos import dllm_task
    from dcache.eval.bench_dllm import default_model_dir
    from dcache.eval.targets import dllm_valid_answers
    from dcache.pipelines.dllm import scripts_task as task
    from dcache.pipelines.dllm.modeling import LLaDAModelLM

    args = ["embedded", 5, 32, 2, "dkv", *widget_values("dllm", "dkv", {"refresh_interval": 4})]
    job = client.submit(*args, api_name="/generate_dllm")
    final = job.result(timeout=300)
    frames = [o for o in job.outputs() if o[0] in ("running", "done")]
    assert final[0] == "done", final[0]
    prompts, mask, _ = task.make_problems(2, gen_length=32, seed=5)
    # the plain side is the uncached sampler on the left-padded prompts with their mask
    plain = LLaDAModelLM.from_pretrained(default_model_dir("llada")).generate(
        prompts, attention_mask=mask, gen_length=32, block_length=dllm_task.BLOCK, steps=32).sequences
    assert final[2] == task.render(plain[0])
    # several valid answers per prompt: the model solves it, with and without the cache
    valid = [task.render(a) for a in dllm_valid_answers(prompts[0], mask[0], 32)]
    assert final[2] in valid and final[3] in valid
    assert final[1] == task.render(prompts[0][mask[0]]) + "\n" + " or\n".join(valid)
    # intermediate frames show masked slots being filled in, never un-filled
    partial = [o[2] for o in frames if o[2] and "?" in o[2]]
    assert partial, "no intermediate canvas was streamed"
    masked = [p.count("?") for p in partial]
    assert masked == sorted(masked, reverse=True)
    assert final[4].count("accuracy 1.000") == 2 and "tokens/s" in final[4]
    assert "same tokens as the plain sampler" in final[4]


def test_video_tab_reports_kv_memory_and_fps(client):
    import dcache
    from dcache.pipelines.ar_video.reference import load_reference

    args = ["embedded", 4, 2, 1, 0, 9, "kv-rolling", *widget_values("ar-video", "kv-rolling", {"window_frames": 3})]
    status, v_base, v_pol, metrics = client.predict(*args, api_name="/generate_video")
    assert status == "done", status
    assert os.path.getsize(v_base) > 0 and os.path.getsize(v_pol) > 0
    pipe = load_reference()
    kv = {}
    for policy, opts in (("kv-full", {}), ("kv-rolling", {"window_frames": 3})):
        with dcache.accelerated(pipe, policy, **opts):
            pipe(prompt=[(4, 2, 1)], num_frames=9, seed=0)
            kv[policy] = pipe.dcache.stats()["kv_bytes"]
    assert number_after(metrics, "KV memory: baseline") == pytest.approx(kv["kv-full"] / 1024, abs=0.05)
    assert number_after(metrics, "· kv-rolling") == pytest.approx(kv["kv-rolling"] / 1024, abs=0.05)
    assert kv["kv-rolling"] < kv["kv-full"]
    assert "fps" in metrics


def test_concurrent_backend_threads_do_not_share_state():
    """The backend alone (no server): two threads, two policies, each result equals its solo run."""
    from dcache.demos import image_task

    solo = {p: image_task.run_image("digits", "7", 3, 8, 4.0, p, {}) for p in ("static", "fbcache")}
    out: dict = {}
    threads = [threading.Thread(target=lambda p=p: out.setdefault(p, image_task.run_image("digits", "7", 3, 8, 4.0, p, {})))
               for p in solo]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in solo:
        assert torch.equal(out[p].accelerated, solo[p].accelerated)
        assert out[p].stats["timeline"] == solo[p].stats["timeline"]


def test_a_long_generation_reports_progress(client):
    import time

    job = client.submit(*image_args("static", seed=31, steps=40), api_name="/generate_image")
    seen = []
    while not job.done():
        st = job.status()
        if st.progress_data:
            seen.append((st.progress_data[0].desc, st.progress_data[0].progress))
        time.sleep(0.02)
    assert job.result()[0] == "done"
    base = [p for d, p in seen if d.startswith("baseline: denoiser call")]
    pol = [p for d, p in seen if d.startswith("static: denoiser call")]
    assert base and pol, seen[:5]
    assert base == sorted(base) and pol == sorted(pol) and max(base + pol) <= 1.0


def test_a_policy_list_shows_both_granularities_in_the_timeline(client, digits_direct):
    import dcache
    from dcache.pipelines.zoo.reference import load_reference_pipeline

    spec = "teacache(threshold=0.3),taylorseer(interval=3)"
    out = client.predict(*image_args("static", seed=2, steps=10, spec=spec), api_name="/generate_image")
    assert out[0] == "done", out[0]
    assert "· teacache + taylorseer " in out[4]
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with dcache.accelerated(pipe, ["teacache", "taylorseer"], teacache={"threshold": 0.3}, taylorseer={"interval": 3}):
        pipe(class_labels=[3], num_inference_steps=10, guidance_scale=4.0, generator=torch.Generator().manual_seed(2),
             output_type="pt")
        stats = pipe.dcache.stats()
    assert parse_timeline(out[6]) == expected_timeline(stats)
    sites = {s for e in stats["timeline"] for s in e["sites"]}
    assert any(s.startswith("blocks[") for s in sites) and any(".attn" in s for s in sites)
    bad = client.predict(*image_args("static", spec="teacache,fbcache"), api_name="/generate_image")
    assert bad[0].startswith("**Error:**") and "one policy per granularity" in bad[0]


def test_a_local_diffusers_pipeline_runs_in_the_demo(client, tmp_path):
    """Any supported pipeline directory: a tiny random DiT saved here, loaded by path."""
    import dcache
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                        num_attention_heads=2, in_channels=4, out_channels=8, attention_bias=True,
                                        activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                        norm_type="ada_norm_zero", norm_elementwise_affine=False)
    vae = AutoencoderKL(sample_size=16, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4)
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=DPMSolverMultistepScheduler(),
                       id2label={0: "zero", 1: "one"})
    pipe.save_pretrained(tmp_path / "dit")
    out = client.predict(*image_args("static", {"interval": 2}, label="1", steps=6, path=str(tmp_path / "dit")),
                         api_name="/generate_image")
    assert out[0] == "done", out[0]
    loaded = DiTPipeline.from_pretrained(tmp_path / "dit")
    loaded.set_progress_bar_config(disable=True)
    with dcache.accelerated(loaded, "static", interval=2):
        want = loaded(class_labels=[1], num_inference_steps=6, guidance_scale=4.0,
                      generator=torch.Generator().manual_seed(0), output_type="np").images[0]
        stats = loaded.dcache.stats()
    shown = np.asarray(Image.open(out[2]).convert("RGB"))
    step = shown.shape[0] // want.shape[0]
    assert np.abs(shown[::step, ::step].astype(int) - (want * 255).round().astype(int)).max() <= 1
    assert parse_timeline(out[6]) == expected_timeline(stats)
    bad = client.predict(*image_args("static", label="cat", steps=4, path=str(tmp_path / "dit")), api_name="/generate_image")
    assert "takes an integer class label" in bad[0]


def test_dllm_and_video_errors_are_messages(client, tmp_path):
    d = client.predict(str(tmp_path / "nope"), 0, 32, 2, "dkv", *widget_values("dllm", "dkv", {}),
                       api_name="/generate_dllm")
    assert d[0].startswith("**Error:**") and "is not a directory" in d[0]
    d = client.predict("embedded", 0, 32, 2, "dkv", *widget_values("dllm", "dkv", {"variant": "'sideways'"}),
                       api_name="/generate_dllm")
    assert d[0].startswith("**Error:**") and "variant" in d[0]
    v = client.predict("embedded", 3, 1, 2, 0, 10, "kv-rolling", *widget_values("ar-video", "kv-rolling", {}),
                       api_name="/generate_video")
    assert v[0].startswith("**Error:**") and "multiple of 3" in v[0]
    v = client.predict(str(tmp_path), 3, 1, 1, 0, 9, "kv-rolling", *widget_values("ar-video", "kv-rolling", {}),
                       api_name="/generate_video")
    assert v[0].startswith("**Error:**"), v[0]
