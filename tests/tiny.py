"""Tiny random-init diffusers pipelines, built offline (no text encoders: embeddings are passed in).

Each factory returns (pipeline, call_kwargs, output_attr, inner_layer) where ``inner_layer`` is a
module deep inside the last block whose calls drop when that block is skipped or forecast.
Recipes follow shared/reference/install-and-offline.md and diffusers' own tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _seed():
    torch.manual_seed(0)


def flux(cfg: bool = False, layers: int = 2, single_layers: int = 2):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    _seed()
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=layers, num_single_layers=single_layers,
                                attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[4, 4, 8]).eval()
    _seed()
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tr)
    _seed()
    kw = dict(prompt_embeds=torch.randn(1, 8, 32), pooled_prompt_embeds=torch.randn(1, 32), height=16, width=16,
              guidance_scale=3.5, output_type="pt")
    if cfg:
        kw.update(negative_prompt_embeds=torch.randn(1, 8, 32), negative_pooled_prompt_embeds=torch.randn(1, 32),
                  true_cfg_scale=4.0)
    return pipe, kw, "images", tr.single_transformer_blocks[-1].attn.to_q


def flux_controlnet():
    """Flux with a ControlNet: the model adds ``controlnet_block_samples`` between its blocks."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    pipe, kw, attr, inner = flux()
    _seed()
    cn = FluxControlNetModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             axes_dims_rope=[4, 4, 8]).eval()
    with torch.no_grad():  # zero-initialised output projections would add nothing
        for p in cn.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    pipe = FluxControlNetPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=pipe.transformer, controlnet=cn)
    _seed()
    kw = dict(kw, control_image=torch.rand(1, 3, 16, 16), controlnet_conditioning_scale=1.0)
    return pipe, kw, attr, inner


def sd3():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    _seed()
    tr = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=3, attention_head_dim=8,
                               num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                               pooled_projection_dim=64, out_channels=4).eval()
    _seed()
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None, transformer=tr)
    _seed()
    kw = dict(prompt_embeds=torch.randn(1, 8, 32), pooled_prompt_embeds=torch.randn(1, 64),
              negative_prompt_embeds=torch.randn(1, 8, 32), negative_pooled_prompt_embeds=torch.randn(1, 64),
              height=16, width=16, guidance_scale=5.0, output_type="pt")
    return pipe, kw, "images", tr.transformer_blocks[-1].attn.to_q


def _small_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    _seed()
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4).eval()


def pixart():
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    _seed()
    tr = PixArtTransformer2DModel(sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                                  caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8,
                                  attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                  norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6).eval()
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_small_vae(), transformer=tr,
                               scheduler=DDIMScheduler())
    _seed()
    kw = dict(negative_prompt=None, prompt_embeds=torch.randn(1, 8, 32), prompt_attention_mask=torch.ones(1, 8),
              negative_prompt_embeds=torch.randn(1, 8, 32), negative_prompt_attention_mask=torch.ones(1, 8),
              guidance_scale=4.5, height=16, width=16, use_resolution_binning=False, output_type="pt")
    return pipe, kw, "images", tr.transformer_blocks[-1].attn1.to_q


def dit():
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    _seed()
    tr = DiTTransformer2DModel(sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=2,
                               in_channels=4, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                               num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False).eval()
    pipe = DiTPipeline(transformer=tr, vae=_small_vae(), scheduler=DPMSolverMultistepScheduler(),
                       id2label={0: "cat", 1: "dog"})
    kw = dict(class_labels=[1], guidance_scale=4.0, output_type="pt")
    return pipe, kw, "images", tr.transformer_blocks[-1].attn1.to_q


def wan():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    _seed()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    _seed()
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                               out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                       transformer=tr)
    _seed()
    kw = dict(prompt_embeds=torch.randn(1, 16, 32), negative_prompt_embeds=torch.randn(1, 16, 32), height=16, width=16,
              num_frames=5, guidance_scale=5.0, output_type="pt")
    return pipe, kw, "frames", tr.blocks[-1].attn1.to_q


def wan22():
    """Wan 2.2 layout: two experts (``transformer`` for high noise, ``transformer_2`` for low)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    pipe, kw, attr, _ = wan()
    _seed()
    torch.manual_seed(1)
    tr2 = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=pipe.vae, scheduler=pipe.scheduler,
                       transformer=pipe.transformer, transformer_2=tr2, boundary_ratio=0.9)
    return pipe, kw, attr, tr2.blocks[-1].attn1.to_q


def cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    _seed()
    tr = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
                                     time_embed_dim=2, text_embed_dim=32, num_layers=3, sample_width=2, sample_height=2,
                                     sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                     max_text_seq_length=16).eval()
    _seed()
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                             scheduler=CogVideoXDDIMScheduler())
    _seed()
    kw = dict(prompt_embeds=torch.randn(1, 16, 32), negative_prompt_embeds=torch.randn(1, 16, 32), height=16, width=16,
              num_frames=9, guidance_scale=6.0, max_sequence_length=16, output_type="pt")
    return pipe, kw, "frames", tr.transformer_blocks[-1].attn1.to_q


def hunyuan_video():
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)

    _seed()
    tr = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                        num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=1,
                                        patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval()
    _seed()
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
                                    spatial_compression_ratio=8, temporal_compression_ratio=4,
                                    mid_block_add_attention=True).eval()
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    _seed()
    kw = dict(prompt_embeds=torch.randn(1, 8, 16), pooled_prompt_embeds=torch.randn(1, 8),
              prompt_attention_mask=torch.ones(1, 8, dtype=torch.long), height=16, width=16, num_frames=5,
              guidance_scale=6.0, output_type="pt")
    return pipe, kw, "frames", tr.single_transformer_blocks[-1].attn.to_q


def ltx():
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    _seed()
    tr = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
                                    attention_head_dim=8, cross_attention_dim=32, num_layers=3,
                                    caption_channels=32).eval()
    _seed()
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False,) * 4,
                                upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
                                patch_size_t=1, encoder_causal=True, decoder_causal=False).eval()
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                       transformer=tr)
    _seed()
    kw = dict(prompt_embeds=torch.randn(1, 8, 32), prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
              negative_prompt_embeds=torch.randn(1, 8, 32),
              negative_prompt_attention_mask=torch.ones(1, 8, dtype=torch.long), height=32, width=32, num_frames=9,
              guidance_scale=3.0, output_type="pt", decode_timestep=0.0, decode_noise_scale=0.0)
    return pipe, kw, "frames", tr.transformer_blocks[-1].attn1.to_q


def qwenimage():
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    _seed()
    tr = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16,
                                     num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False,
                                     axes_dims_rope=(8, 4, 4)).eval()
    _seed()
    vae = AutoencoderKLQwenImage(base_dim=4 * 6, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    pipe = QwenImagePipeline(transformer=tr, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None,
                             tokenizer=None)
    _seed()
    kw = dict(prompt_embeds=torch.randn(1, 8, 16), prompt_embeds_mask=torch.ones(1, 8, dtype=torch.long),
              negative_prompt_embeds=torch.randn(1, 8, 16),
              negative_prompt_embeds_mask=torch.ones(1, 8, dtype=torch.long), true_cfg_scale=4.0, height=32, width=32,
              output_type="pt")
    return pipe, kw, "images", tr.transformer_blocks[-1].attn.to_q


def sd_unet():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    _seed()
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2).eval()
    _seed()
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    _seed()
    kw = dict(prompt_embeds=torch.randn(1, 77, 8), negative_prompt=None, negative_prompt_embeds=torch.randn(1, 77, 8),
              height=32, width=32, guidance_scale=7.5, output_type="pt")
    return pipe, kw, "images", unet.up_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q


def flux_micro():
    """Flux with one block of each kind: compile tests trace it in seconds."""
    return flux(layers=1, single_layers=1)


FACTORIES = {
    "flux": flux,
    "flux_micro": flux_micro,
    "flux_controlnet": flux_controlnet,
    "sd3": sd3,
    "pixart": pixart,
    "dit": dit,
    "wan": wan,
    "wan22": wan22,
    "cogvideox": cogvideox,
    "hunyuan_video": hunyuan_video,
    "ltx": ltx,
    "qwenimage": qwenimage,
    "sd_unet": sd_unet,
}


def build(name: str):
    pipe, kw, attr, inner = FACTORIES[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe, kw, attr, inner
