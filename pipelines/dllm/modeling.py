"""LLaDA- and Dream-compatible masked diffusion LMs in plain torch, with an active-token forward.

Both classes hold their weights under the official checkpoint names (LLaDA:
``model.transformer.blocks.N.q_proj.weight``…; Dream: ``model.layers.N.self_attn.q_proj.weight``…),
so ``from_pretrained`` loads the official safetensors directly and ``save_pretrained`` writes them.

Besides the plain forward (``model(input_ids, attention_mask)`` → logits for every position) the
forward takes ``active`` (B, A) indices into the canvas and a :class:`KVCache`. Then only the
active tokens run through the layers; their keys/values are written into the cache in place, and
their queries attend to every key marked usable in ``key_mask``. Keys are stored **before RoPE**
and rotated each forward from the canvas positions (the dKV-Cache / Fast-dLLM convention). Rows
may have different numbers of active tokens: pad ``active`` with the canvas length ``L``, which
points at a spare cache slot that no query ever attends to.

Example::

    model = LLaDAModelLM(LLaDAConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=32))
    logits = model(ids).logits                          # (B, L, V)
    cache = KVCache()
    model(ids, cache=cache)                             # full forward, fills the cache
    out = model(ids, active=idx, cache=cache, key_mask=usable)   # (B, A, V) logits
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dcache.pipelines.dllm.config import DreamConfig, LLaDAConfig

__all__ = ["KVCache", "LLaDAModelLM", "DreamModel", "DLLMOutput", "position_ids_from_mask"]


@dataclass
class DLLMOutput:
    logits: torch.Tensor


class KVCache:
    """Per-layer pre-RoPE keys and values for every canvas position, plus one spare slot.

    Buffers have shape (B, H_kv, L + 1, head_dim); slot ``L`` receives the K/V of padded active
    entries and is never attended to. Which slots are *usable* is the caller's (the policy's)
    decision, passed to the forward as ``key_mask``.
    """

    def __init__(self, keep_hidden: bool = False) -> None:
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        self.kr: list[torch.Tensor] = []  # the same keys rotated: canvas positions are fixed for a run
        self.h: list[torch.Tensor] = []
        self.rope: tuple | None = None
        self.length = 0
        self.keep_hidden = keep_hidden  # also keep every layer's input (elastic recomputes from a depth)
        # drift-based policies (elastic) set an object with widen(layer) -> bool and
        # before_attention / after_attention(layer, active, q_rotated, keys_rotated, mask)
        self.probe: Any = None

    def reset(self) -> None:
        self.k, self.v, self.kr, self.h, self.rope, self.length = [], [], [], [], None, 0

    @property
    def filled(self) -> bool:
        return bool(self.k)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.kr + self.h if t is not None)

    def _ensure_hidden(self, n_layers: int, like: torch.Tensor, L: int) -> None:
        B, _, D = like.shape
        if self.h and self.h[0].shape == (B, L + 1, D) and self.h[0].dtype == like.dtype:
            return
        self.h = [like.new_zeros(B, L + 1, D) for _ in range(n_layers)]

    def _ensure(self, n_layers: int, like: torch.Tensor, L: int) -> None:
        B, H, _, D = like.shape
        if self.k and self.k[0] is not None and self.k[0].shape[0] == B and self.length == L \
                and self.k[0].dtype == like.dtype and self.k[0].device == like.device:
            return
        self.length = L
        self.k = [like.new_zeros(B, H, L + 1, D) for _ in range(n_layers)]
        self.v = [like.new_zeros(B, H, L + 1, D) for _ in range(n_layers)]
        self.kr = [like.new_zeros(B, H, L + 1, D) for _ in range(n_layers)]

    def rope_tables(self, position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
        # the generation loop passes the same position tensor every step; build its tables once
        if self.rope is None or self.rope[0] is not position_ids:
            self.rope = (position_ids, *_rope_tables(position_ids, head_dim, theta, dtype))
        return self.rope[1], self.rope[2]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the same positions as
    the unpadded one (Dream's convention; LLaDA's padded batches use it too here)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # the same arithmetic in one fused op: per-op overhead dominates small cached steps
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # fp32 statistics as in the official code; bf16 variance underflows otherwise
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(x.dtype) * self.weight


def _rope_tables(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    f = pos.float()[..., None] * inv                      # (B, L, D/2)
    emb = torch.cat([f, f], dim=-1)[:, None]               # (B, 1, L, D)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    if x.dtype == cos.dtype:
        return x * cos + rot * sin
    # half-precision models rotate in fp32 (LLaDA's rope_full_precision)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


class _Parts:
    """Uniform view of one transformer layer (names differ between LLaDA and Dream)."""

    __slots__ = ("norm1", "q", "k", "v", "o", "norm2", "gate", "up", "down")

    def __init__(self, *mods: nn.Module) -> None:
        for name, m in zip(self.__slots__, mods):
            setattr(self, name, m)


class _DLLMBase(nn.Module):
    """Shared forward of both families. Subclasses build modules under the official names."""

    _dcache_task = "dllm"
    config_class: Any = None

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self._dcache_policy = None

    # --- pieces the subclasses provide -------------------------------------------------------
    def _embed(self) -> nn.Embedding: ...
    def _final_norm(self) -> nn.Module: ...
    def _head(self) -> nn.Module: ...
    def _layer_parts(self) -> list[_Parts]: ...

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def logits_shift(self) -> int:
        return self.config.logits_shift

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # --- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        active: torch.Tensor | None = None,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> DLLMOutput:
        """Logits for every position, or for ``active`` positions only when ``active`` is given.

        ``attention_mask`` (B, L): 1 for real tokens, 0 for padding (keys only; padded queries
        still produce logits, which callers ignore). ``active`` needs a filled ``cache`` and a
        ``key_mask`` (B, L) of cached slots usable as keys; the active slots are added to it.
        ``attn_mask`` (B, L, L) bool, full forwards only: which keys each query may attend to
        (ablations that cut attention); combined with ``attention_mask``.
        """
        B, L = input_ids.shape
        cfg = self.config
        if attention_mask is not None and attention_mask.shape != (B, L):
            raise ValueError(f"attention_mask must have shape {(B, L)}, got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = (position_ids_from_mask(attention_mask) if attention_mask is not None
                            else torch.arange(L, device=input_ids.device).expand(B, L))
        parts = self._layer_parts()
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dtype = self._embed().weight.dtype

        if active is None:
            h = self._embed()(input_ids)
            cos, sin = (cache.rope_tables(position_ids, hd, cfg.rope_theta, dtype) if cache is not None
                        else _rope_tables(position_ids, hd, cfg.rope_theta, dtype))
            qcos, qsin = cos, sin
            mask = None
            if attention_mask is not None and not bool(attention_mask.all()):
                mask = attention_mask.bool()[:, None, None, :]
            if attn_mask is not None:
                if attn_mask.shape != (B, L, L):
                    raise ValueError(f"attn_mask must have shape {(B, L, L)}, got {tuple(attn_mask.shape)}")
                mask = attn_mask.bool()[:, None] if mask is None else (mask & attn_mask.bool()[:, None])
            Lq = L
        else:
            if attn_mask is not None:
                raise ValueError("attn_mask applies to full forwards only")
            if cache is None or not cache.filled or cache.length != L:
                raise ValueError("an active-token forward needs a KVCache filled by a full forward on this canvas")
            if key_mask is None:
                raise ValueError("an active-token forward needs key_mask (B, L): which cached slots are usable")
            if active.dim() != 2 or active.shape[0] != B:
                raise ValueError(f"active must be (B, A) indices, got shape {tuple(active.shape)}")
            safe = active.clamp_max(L - 1)
            h = self._embed()(input_ids.gather(1, safe))
            qpos = position_ids.gather(1, safe)
            qcos, qsin = _rope_tables(qpos, hd, cfg.rope_theta, dtype)
            cos, sin = cache.rope_tables(position_ids, hd, cfg.rope_theta, dtype)
            act = torch.zeros(B, L + 1, dtype=torch.bool, device=input_ids.device)
            act.scatter_(1, active, True)
            keys = key_mask.bool() | act[:, :L]
            if attention_mask is not None:
                keys &= attention_mask.bool()
            # an all-true mask is dropped: SDPA's unmasked kernel is the faster one on CPU
            mask = None if bool(keys.all()) else keys[:, None, None, :]
            Lq = active.shape[1]
            scatter_idx = active[:, None, :, None]

        keep_h = cache is not None and cache.keep_hidden
        probe = cache.probe if cache is not None else None
        out_idx = None  # set when an active forward widens to every token (elastic refresh)
        for li, p in enumerate(parts):
            if keep_h:
                if active is None:
                    if li == 0:
                        cache._ensure_hidden(len(parts), h, L)
                    cache.h[li][:, :L] = h
                else:
                    cache.h[li].scatter_(1, active[:, :, None].expand(B, Lq, h.shape[-1]), h)
            if active is not None and probe is not None and probe.widen(li):
                # recompute every token from this layer on, from the cached layer inputs
                if not keep_h:
                    raise ValueError("widening an active forward needs a KVCache with keep_hidden=True")
                out_idx = safe
                h = cache.h[li][:, :L].clone()
                active, Lq, qcos, qsin = None, L, cos, sin
                mask = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None
            x = p.norm1(h)
            q = p.q(x).view(B, Lq, nh, hd).transpose(1, 2)
            k = p.k(x).view(B, Lq, nkv, hd).transpose(1, 2)
            v = p.v(x).view(B, Lq, nkv, hd).transpose(1, 2)
            qq = _rotate(q, qcos, qsin)
            if probe is not None and cache.filled and li < len(cache.kr):
                probe.before_attention(li, active, qq, cache.kr[li][:, :, :L], mask)
            if active is None:
                if cache is not None:
                    if li == 0:
                        cache._ensure(len(parts), k, L)
                    cache.k[li][:, :, :L] = k
                    cache.v[li][:, :, :L] = v
                kk, vv = _rotate(k, cos, sin), v
                if cache is not None:
                    cache.kr[li][:, :, :L] = kk
            else:
                idx = scatter_idx.expand(B, nkv, Lq, hd)
                cache.k[li].scatter_(2, idx, k)
                cache.v[li].scatter_(2, idx, v)
                # only the new keys are rotated (at their own positions, the queries' tables)
                cache.kr[li].scatter_(2, idx, _rotate(k, qcos, qsin))
                kk = cache.kr[li][:, :, :L]
                vv = cache.v[li][:, :, :L]
            if probe is not None:
                probe.after_attention(li, active, qq, kk, mask)
            a = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=nkv != nh)
            h = h + p.o(a.transpose(1, 2).reshape(B, Lq, nh * hd))
            x = p.norm2(h)
            h = h + p.down(F.silu(p.gate(x)) * p.up(x))
        if out_idx is not None:
            h = h.gather(1, out_idx[:, :, None].expand(B, out_idx.shape[1], h.shape[-1]))
        logits = self._head()(self._final_norm()(h))
        return DLLMOutput(logits=logits)

    # --- weights ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str) -> None:
        """Write ``config.json`` and ``model.safetensors`` in the official layout."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        self.config.save_pretrained(directory)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", **_: Any) -> Any:
        """Load from a local directory (``config.json`` + safetensors, sharded or not) or a hub id.

        Example::

            model = LLaDAModelLM.from_pretrained("GSAI-ML/LLaDA-8B-Instruct", dtype=torch.bfloat16)
        """
        path = name_or_path
        if not os.path.isdir(path):
            try:
                from huggingface_hub import snapshot_download

                path = snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"])
            except Exception as e:  # offline, unknown repo, no huggingface_hub
                raise ValueError(f"{name_or_path!r} is not a local directory and could not be fetched "
                                 f"from the hub ({type(e).__name__}: {e})") from e
        config = cls.config_class.from_pretrained(path)
        model = cls(config)
        state = _read_safetensors(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if cls._tied_head_name(config) in missing:
            missing = [m for m in missing if m != cls._tied_head_name(config)]
        if missing or unexpected:
            raise ValueError(f"weights in {path!r} do not match {cls.__name__}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device).eval()

    @staticmethod
    def _tied_head_name(config: Any) -> str:
        return ""

    # --- generation and the dcache protocol ----------------------------------------------------
    def generate(self, input_ids: Any, **kwargs: Any) -> Any:
        """Generate with this family's sampler; see :mod:`dcache.pipelines.dllm.generate`."""
        from dcache.pipelines.dllm import generate as g

        fn = g.llada_generate if self.logits_shift == 0 else g.dream_generate
        return fn(self, input_ids, **kwargs)

    def _dcache_accelerate(self, configs: list) -> None:
        from dcache.pipelines.dllm.runtime import DLLMCacheHandle

        kv = [c for c in configs if getattr(c, "granularity", None) == "kv"]
        if len(kv) != 1 or len(configs) != 1:
            raise ValueError("a dLLM model takes exactly one KV policy (dkv, prefix-cache, dual-cache, elastic)")
        self._dcache_policy = kv[0]
        self.dcache = DLLMCacheHandle(kv[0])

    def _dcache_disable(self) -> None:
        self._dcache_policy = None
        if "dcache" in self.__dict__:
            del self.__dict__["dcache"]


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no .safetensors weights in {path!r}")
    state: dict[str, torch.Tensor] = {}
    for fn in files:
        state.update(load_file(os.path.join(path, fn)))
    return state


# ------------------------------------------------------------------------------------------------
# LLaDA


class _LLaDABlock(nn.Module):
    def __init__(self, c: LLaDAConfig) -> None:
        super().__init__()
        hd = c.d_model // c.n_heads
        self.attn_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=c.include_qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * hd, bias=c.include_qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * hd, bias=c.include_qkv_bias)
        self.attn_out = nn.Linear(c.d_model, c.d_model, bias=False)
        self.ff_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)  # the gate
        self.up_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden_size, c.d_model, bias=False)


class LLaDAModelLM(_DLLMBase):
    """LLaDA masked diffusion LM (weights named as in ``GSAI-ML/LLaDA-8B-*``).

    Example::

        model = LLaDAModelLM.from_pretrained("path/to/llada")
        out = model.generate(prompt_ids, gen_length=128, block_length=32, steps=128)
    """

    config_class = LLaDAConfig

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        c = config
        t = nn.Module()
        t.wte = nn.Embedding(c.embedding_size, c.d_model)
        t.blocks = nn.ModuleList(_LLaDABlock(c) for _ in range(c.n_layers))
        t.ln_f = RMSNorm(c.d_model, c.rms_norm_eps)
        if not c.weight_tying:
            t.ff_out = nn.Linear(c.d_model, c.embedding_size, bias=False)
        self.model = nn.Module()
        self.model.transformer = t
        self._parts = [_Parts(b.attn_norm, b.q_proj, b.k_proj, b.v_proj, b.attn_out, b.ff_norm,
                              b.ff_proj, b.up_proj, b.ff_out) for b in t.blocks]
        nn.init.normal_(t.wte.weight, std=0.02)

    def _embed(self):
        return self.model.transformer.wte

    def _final_norm(self):
        return self.model.transformer.ln_f

    def _head(self):
        t = self.model.transformer
        return t.ff_out if not self.config.weight_tying else (lambda h: F.linear(h, t.wte.weight))

    def _layer_parts(self):
        return self._parts


# ------------------------------------------------------------------------------------------------
# Dream


class _DreamAttention(nn.Module):
    def __init__(self, c: DreamConfig) -> None:
        super().__init__()
        hd = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * hd, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * hd, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * hd, bias=True)
        self.o_proj = nn.Linear(c.num_attention_heads * hd, c.hidden_size, bias=False)


class _DreamMLP(nn.Module):
    def __init__(self, c: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


class _DreamLayer(nn.Module):
    def __init__(self, c: DreamConfig) -> None:
        super().__init__()
        self.self_attn = _DreamAttention(c)
        self.mlp = _DreamMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class DreamModel(_DLLMBase):
    """Dream masked diffusion LM (Qwen2 weight names, bidirectional, logits shifted by one).

    Example::

        model = DreamModel.from_pretrained("path/to/dream")
        out = model.generate(prompt_ids, max_new_tokens=256, steps=256)
    """

    config_class = DreamConfig

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        c = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(_DreamLayer(c) for _ in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self._parts = [_Parts(l.input_layernorm, l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj,
                              l.self_attn.o_proj, l.post_attention_layernorm, l.mlp.gate_proj,
                              l.mlp.up_proj, l.mlp.down_proj) for l in self.model.layers]
        nn.init.normal_(self.model.embed_tokens.weight, std=0.02)

    def _embed(self):
        return self.model.embed_tokens

    def _final_norm(self):
        return self.model.norm

    def _head(self):
        if self.config.tie_word_embeddings:
            return lambda h: F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head

    def _layer_parts(self):
        return self._parts

    def diffusion_generate(self, input_ids, **kwargs):
        """Dream's name for :meth:`generate`."""
        return self.generate(input_ids, **kwargs)
