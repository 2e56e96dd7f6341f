"""Chunk-wise causal (Self-Forcing style) video generation on diffusers' WanTransformer3DModel.

Per chunk of ``chunk_frames`` latent frames: a few-step x0-prediction sampler (predict the flow,
x0 = x_t - sigma * v, re-noise to the next sigma with fresh noise), then one clean pass at
``context_noise`` that commits the chunk's K/V to the cache. Self-attention keys are cached
post-RoPE at absolute frame positions; the text cross-attention K/V are computed once per
generation. The KV cache comes from an AR-video policy (``kv-full`` unless accelerated).

Example::

    pipe = ARVideoPipeline.from_pretrained("path/to/arvideo_digits")
    video = pipe(prompt_embeds, num_frames=21, seed=0).frames      # [B, C, F, H, W]
    dcache.accelerate(pipe, policy="forcing-kv")
    video2 = pipe(prompt_embeds, num_frames=21, seed=0).frames
    print(pipe.dcache.stats())
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dcache.pipelines.ar_video.attention import CachedCrossAttnProcessor, CausalSelfAttnProcessor, FrameOffsetRope, RecencyBias, RunContext
from dcache.schedulers._kv_ring import CacheLayout

__all__ = ["ARVideoConfig", "ARVideoPipeline", "ARVideoOutput", "block_causal_frame_mask", "sigmas_for"]

PIPELINE_CONFIG = "arvideo_pipeline.json"
RECENCY_FILE = "temporal_bias.json"
# x0-renoise: Self-Forcing's few-step sampler for distilled generators (predict x0, re-noise with
# fresh noise to the next level); euler: the flow-matching ODE (x += (sigma_next - sigma) * v, down to
# sigma 0, no fresh noise), the sampler a model trained by plain flow matching expects.
SAMPLERS = ("x0-renoise", "euler")
HEAD_FILE = "forcingkv_heads.json"


@dataclass
class ARVideoConfig:
    """Sampling setup (Self-Forcing defaults: chunk 3, steps 1000/750/500/250 warped with shift 5).

    chunk_frames >= 1; denoising_steps: strictly decreasing values in (0, 1000]; shift > 0;
    context_noise in [0, 1000): timestep of the clean commit pass; pixel_shuffle: 0 = output
    latents, r >= 2 = decode by depth-to-space with factor r and map [-1, 1] to [0, 1] (the
    reference models' "VAE").
    height/width: default latent size (0 = must be given per call).
    sampler: "x0-renoise" (Self-Forcing's, for distilled few-step generators) or "euler" (the
    flow-matching ODE down to sigma 0 over the same levels, for models trained by plain flow matching).
    """

    chunk_frames: int = 3
    denoising_steps: tuple = (1000, 750, 500, 250)
    shift: float = 5.0
    context_noise: float = 0.0
    pixel_shuffle: int = 0
    height: int = 0
    width: int = 0
    sampler: str = "x0-renoise"

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_frames, int) or self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be an int >= 1, got {self.chunk_frames!r}")
        steps = tuple(float(s) for s in self.denoising_steps)
        if not steps or any(not 0 < s <= 1000 for s in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"denoising_steps must be strictly decreasing values in (0, 1000], got {self.denoising_steps!r}")
        self.denoising_steps = steps
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift!r}")
        if not 0 <= self.context_noise < 1000:
            raise ValueError(f"context_noise must be in [0, 1000), got {self.context_noise!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.pixel_shuffle not in (0,) and (not isinstance(self.pixel_shuffle, int) or self.pixel_shuffle < 2):
            raise ValueError(f"pixel_shuffle must be 0 or an int >= 2, got {self.pixel_shuffle!r}")


def sigmas_for(steps: tuple, shift: float) -> list[float]:
    """Warped sigmas: sigma = shift*s / (1 + (shift-1)*s) with s = step/1000 (Self-Forcing warping)."""
    return [shift * (s / 1000) / (1 + (shift - 1) * (s / 1000)) for s in steps]


def block_causal_frame_mask(num_frames: int, chunk_frames: int) -> torch.Tensor:
    """[F, F] bool: frame i may attend frame j iff j's chunk is not after i's chunk."""
    c = torch.arange(num_frames) // chunk_frames
    return c[None, :] <= c[:, None]


@dataclass
class ARVideoOutput:
    frames: torch.Tensor  # pixels if the pipeline decodes, else latents: [B, C, F, H, W]
    latents: torch.Tensor
    timings: dict = field(default_factory=dict)


class _DcacheHandle:
    """``pipe.dcache`` while accelerated: stats of the last generation and a reset."""

    def __init__(self, pipe: "ARVideoPipeline"):
        self._pipe = pipe

    def stats(self) -> dict:
        p = self._pipe
        out = {"policy": type(p._policy).policy_name, "config": asdict(p._policy)}
        out.update(p._last_stats)
        out.update(p.last_timings)
        return out

    def reset(self) -> None:
        self._pipe._last_stats = {}
        self._pipe.last_timings = {}


class ARVideoPipeline:
    """Autoregressive chunk-wise video generation with a policy-driven self-attention KV cache."""

    _dcache_task = "ar-video"

    def __init__(self, transformer: Any, config: ARVideoConfig | None = None, head_file: str | None = None,
                 text_encoder: Callable[[Any], torch.Tensor] | None = None, recency: RecencyBias | dict | None = None):
        from dcache.schedulers.kv_full import KVFullConfig

        self.transformer = transformer
        self.config = config or ARVideoConfig()
        self.head_file = head_file
        self.text_encoder = text_encoder
        self.ctx = RunContext()
        if isinstance(recency, dict):
            recency = RecencyBias(**recency)
        if recency is not None and tuple(recency.slopes.shape) != (len(transformer.blocks), transformer.config.num_attention_heads):
            raise ValueError(f"recency slopes have shape {tuple(recency.slopes.shape)}, the model has "
                             f"{len(transformer.blocks)} layers x {transformer.config.num_attention_heads} heads")
        self.ctx.recency = recency
        self._install()
        self._default_policy = KVFullConfig()
        self._policy = self._default_policy
        self._last_stats: dict = {}
        self.last_timings: dict = {}
        self.trace: list | None = None  # set to [] to record every forward (tests)
        self.cache_hook: Callable[[Any], Any] | None = None  # wraps each generation's cache (diagnostics)

    # -- model surgery (instance only) ------------------------------------------------------------
    def _install(self) -> None:
        tr = self.transformer
        if not isinstance(tr.rope, FrameOffsetRope):
            tr.rope = FrameOffsetRope(tr.rope, self.ctx)
        else:  # a transformer handed from one pipeline to another follows the newest one
            tr.rope.ctx = self.ctx
        for i, block in enumerate(tr.blocks):
            block.attn1.set_processor(CausalSelfAttnProcessor(i, self.ctx))
            block.attn2.set_processor(CachedCrossAttnProcessor(i, self.ctx))

    @property
    def num_layers(self) -> int:
        return len(self.transformer.blocks)

    @property
    def num_heads(self) -> int:
        return self.transformer.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.transformer.config.attention_head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_out.weight.device

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.transformer.config.patch_size
        if height % ph or width % pw:
            raise ValueError(f"latent height/width must be multiples of the patch size {(ph, pw)}, got {(height, width)}")
        return (height // ph) * (width // pw)

    # -- dcache protocol ----------------------------------------------------------------------------
    def _dcache_accelerate(self, configs: list) -> None:
        kv = [c for c in configs if getattr(c, "granularity", None) == "kv"]
        if len(configs) != 1 or len(kv) != 1:
            raise ValueError(f"the AR video pipeline takes exactly one kv policy (kv-full, kv-rolling, forcing-kv), got {[type(c).__name__ for c in configs]}")
        self._policy = kv[0]
        self._last_stats = {}
        self.last_timings = {}
        self.dcache = _DcacheHandle(self)

    def _dcache_disable(self) -> None:
        self._policy = self._default_policy
        self._last_stats = {}
        if hasattr(self, "dcache"):
            del self.dcache

    def make_cache(self, num_frames: int, height: int, width: int, batch_size: int):
        layout = CacheLayout(self.num_layers, self.num_heads, self.head_dim, self.tokens_per_frame(height, width),
                             self.config.chunk_frames, num_frames, batch_size, self.dtype, self.device)
        if type(self._policy).policy_name == "forcing-kv":
            return self._policy.build_cache(layout, default_head_file=self.head_file)
        return self._policy.build_cache(layout)

    # -- forwards -----------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]

    @torch.no_grad()
    def forward_chunk(self, x: torch.Tensor, sigma: float, frame_start: int, prompt_embeds: torch.Tensor, cache, commit: bool) -> torch.Tensor:
        """One model call on a chunk at absolute frame ``frame_start`` through ``cache``; returns v."""
        ctx = self.ctx
        ctx.mode, ctx.cache, ctx.commit, ctx.frame_start = "cache", cache, commit, frame_start
        ctx.frame_positions = torch.arange(frame_start, frame_start + x.shape[2])
        t = torch.full((x.shape[0],), sigma * 1000.0, device=x.device, dtype=torch.float32)
        try:
            v = self._run(x, t, prompt_embeds)
        finally:
            ctx.mode, ctx.cache, ctx.commit, ctx.frame_positions = "dense", None, False, None
        if self.trace is not None:
            self.trace.append({"frame_start": frame_start, "sigma": sigma, "x": x.clone(), "v": v.clone(), "commit": commit})
        return v

    def forward_dense(self, x: torch.Tensor, frame_sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
                      frame_positions: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One full-sequence call with a frame-level attention mask and per-frame sigmas ([B, F]).

        This is the training forward and the exactness reference for the cached loop.
        """
        B, _, nf, h, w = x.shape
        T = self.tokens_per_frame(h, w)
        ctx = self.ctx
        ctx.mode, ctx.frame_mask, ctx.tokens_per_frame = "dense", frame_mask, T
        ctx.frame_positions = frame_positions
        ctx.cross_cache_on = False
        t = (frame_sigmas.float() * 1000.0).repeat_interleave(T, dim=1)
        try:
            return self._run(x, t, prompt_embeds)
        finally:
            ctx.frame_mask, ctx.frame_positions = None, None

    # -- generation ---------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        r = self.config.pixel_shuffle
        if not r:
            return latents
        B, C, nf, h, w = latents.shape
        px = F.pixel_shuffle(latents.transpose(1, 2).reshape(B * nf, C, h, w), r)
        return (px.reshape(B, nf, *px.shape[1:]).transpose(1, 2) + 1) / 2

    @torch.no_grad()
    def __call__(self, prompt_embeds: torch.Tensor | None = None, num_frames: int = 21, height: int | None = None,
                 width: int | None = None, seed: int = 0, prompt: Any = None, decode: bool = True,
                 context_frames: torch.Tensor | None = None) -> ARVideoOutput:
        """Generate ``num_frames`` latent frames (a multiple of ``chunk_frames``).

        Give ``prompt_embeds`` ([B, L, text_dim]) or ``prompt`` (passed to ``text_encoder``).
        ``height``/``width`` are latent sizes (default: the model's ``sample_size`` in its config).
        ``context_frames``: optional given latents ``[B, C, K, h, w]`` (K a multiple of
        ``chunk_frames``, K < num_frames), image-to-video style: their chunks are not generated,
        only committed (clean pass, as a generated chunk would be) and copied to the output;
        generation continues after them.
        """
        cfg = self.config
        C = cfg.chunk_frames
        if not isinstance(num_frames, int) or num_frames < C or num_frames % C:
            raise ValueError(f"num_frames must be a positive multiple of chunk_frames={C}, got {num_frames!r}")
        t0 = time.perf_counter()
        if prompt_embeds is None:
            if prompt is None or self.text_encoder is None:
                raise ValueError("give prompt_embeds, or prompt together with a pipeline text_encoder")
            prompt_embeds = self.text_encoder(prompt)
        prompt_embeds = prompt_embeds.to(self.device, self.dtype)
        height = height or cfg.height
        width = width or cfg.width
        if not height or not width:
            raise ValueError("give height and width (latent size)")
        B = prompt_embeds.shape[0]
        ch = self.transformer.config.in_channels
        n_ctx = 0
        if context_frames is not None:
            n_ctx = context_frames.shape[2] if context_frames.dim() == 5 else -1
            if (n_ctx < C or n_ctx % C or n_ctx >= num_frames
                    or tuple(context_frames.shape) != (B, ch, n_ctx, height, width)):
                raise ValueError(f"context_frames must be [B={B}, C={ch}, K, {height}, {width}] with K a multiple of "
                                 f"chunk_frames={C} below num_frames={num_frames}, got {tuple(context_frames.shape)}")
            context_frames = context_frames.to(self.device, self.dtype)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        sig = sigmas_for(cfg.denoising_steps, cfg.shift)
        ctx_sigma = sigmas_for((cfg.context_noise,), cfg.shift)[0] if cfg.context_noise else 0.0
        cache = self.make_cache(num_frames, height, width, B)
        if self.cache_hook is not None:
            cache = self.cache_hook(cache)
        self.ctx.cross_cache.clear()
        self.ctx.cross_cache_on = True
        out = torch.empty(B, ch, num_frames, height, width, dtype=self.dtype, device=self.device)

        def noise():
            return torch.randn(B, ch, C, height, width, generator=gen).to(self.device, self.dtype)

        t1 = time.perf_counter()
        try:
            for fs in range(0, num_frames, C):
                x = noise()
                if fs < n_ctx:
                    x0 = out[:, :, fs : fs + C] = context_frames[:, :, fs : fs + C]
                    ctx_in = x0 if not ctx_sigma else (1 - ctx_sigma) * x0 + ctx_sigma * noise()
                    self.forward_chunk(ctx_in, ctx_sigma, fs, prompt_embeds, cache, commit=True)
                    continue
                for i, s in enumerate(sig):
                    v = self.forward_chunk(x, s, fs, prompt_embeds, cache, commit=False)
                    if cfg.sampler == "euler":
                        x = x + ((sig[i + 1] if i + 1 < len(sig) else 0.0) - s) * v
                        x0 = x
                        continue
                    x0 = x - s * v
                    if i + 1 < len(sig):
                        x = (1 - sig[i + 1]) * x0 + sig[i + 1] * noise()
                out[:, :, fs : fs + C] = x0
                if fs + C < num_frames:
                    ctx_in = x0 if not ctx_sigma else (1 - ctx_sigma) * x0 + ctx_sigma * noise()
                    self.forward_chunk(ctx_in, ctx_sigma, fs, prompt_embeds, cache, commit=True)
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
        finally:
            self.ctx.cross_cache_on = False
            self.ctx.cross_cache.clear()
        t2 = time.perf_counter()
        frames = self.decode(out) if decode else out
        if frames.is_cuda:
            torch.cuda.synchronize(frames.device)
        t3 = time.perf_counter()
        # keep numbers, not tensors: the cache is freed when the generation ends
        self._last_stats = cache.stats()
        del cache
        self.last_timings = {
            "num_frames": num_frames,
            "denoise_s": t2 - t1,
            "end_to_end_s": t3 - t0,
            "fps_denoise": num_frames / (t2 - t1),
            "fps_end_to_end": num_frames / (t3 - t0),
        }
        return ARVideoOutput(frames=frames, latents=out, timings=dict(self.last_timings))

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32, **kw) -> "ARVideoPipeline":
        """Load from a local directory: a diffusers ``WanTransformer3DModel`` folder (``transformer/``
        or the directory itself) plus optional ``arvideo_pipeline.json`` and ``forcingkv_heads.json``.
        Self-Forcing / LongLive ``.pt`` checkpoints: see :mod:`dcache.pipelines.ar_video.convert`."""
        from diffusers import WanTransformer3DModel

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"{path!r} is not a local directory (no hub access); convert checkpoints with dcache.pipelines.ar_video.convert")
        tdir = os.path.join(path, "transformer") if os.path.isdir(os.path.join(path, "transformer")) else path
        transformer = WanTransformer3DModel.from_pretrained(tdir, torch_dtype=torch_dtype).eval()
        cfg_path = os.path.join(path, PIPELINE_CONFIG)
        cfg = ARVideoConfig()
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = ARVideoConfig(**json.load(f))
        head = os.path.join(path, HEAD_FILE)
        kw.setdefault("head_file", head if os.path.exists(head) else None)
        rec = os.path.join(path, RECENCY_FILE)
        if "recency" not in kw and os.path.exists(rec):
            with open(rec) as f:
                kw["recency"] = json.load(f)
        return cls(transformer, cfg, **kw)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        self.transformer.save_pretrained(path)
        with open(os.path.join(path, PIPELINE_CONFIG), "w") as f:
            json.dump(asdict(self.config), f, indent=1)
        if self.ctx.recency is not None:
            with open(os.path.join(path, RECENCY_FILE), "w") as f:
                json.dump(self.ctx.recency.to_dict(), f, indent=1)
