"""Load Self-Forcing / LongLive / CausVid-style checkpoints (original Wan key names) from local files.

Self-Forcing saves ``{"generator": sd, "generator_ema": sd}`` with keys prefixed ``model.`` and
named the original Wan way. The renaming to diffusers' ``WanTransformer3DModel`` is the one
diffusers' single-file converter uses (self_attn->attn1, cross_attn->attn2, q/k/v/o->to_q/to_k/
to_v/to_out.0, modulation->scale_shift_table, head.head->proj_out, text/time embeddings ->
condition_embedder, ffn.0/2 -> ffn.net.0.proj/ffn.net.2, and the original norm3 (the affine
cross-attention norm) becomes norm2). LongLive's LoRA must be merged beforehand.

Example::

    pipe = load_self_forcing("checkpoints/self_forcing_dmd.pt", num_heads=12)
"""

from __future__ import annotations

import os
import re

import torch

__all__ = ["convert_state_dict", "config_from_state_dict", "load_self_forcing"]

_TOP = [
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
]
_BLOCK = [
    ("self_attn.", "attn1."),
    ("cross_attn.", "attn2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("norm3.", "norm2."),
]
_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}


def _pick_weights(obj: dict, use_ema: bool) -> dict:
    for key in (("generator_ema", "generator") if use_ema else ("generator", "generator_ema")):
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], dict) and any(torch.is_tensor(v) for v in obj[key].values()):
            return obj[key]
    return obj


def convert_state_dict(sd: dict, use_ema: bool = True) -> dict:
    """Original Wan / Self-Forcing names -> diffusers names (tensors are not copied)."""
    sd = _pick_weights(sd, use_ema)
    if any("lora_A" in k or "lora_B" in k or "lora_down" in k for k in sd):
        raise ValueError("checkpoint holds LoRA weights (LongLive); merge the LoRA into the base weights before loading")
    out = {}
    for k, v in sd.items():
        for prefix in ("model.diffusion_model.", "model.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        if k == "head.modulation":
            k = "scale_shift_table"
        for a, b in _TOP:
            if k.startswith(a):
                k = b + k[len(a):]
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        if m:
            i, rest = m.groups()
            if rest == "modulation":
                rest = "scale_shift_table"
            for a, b in _BLOCK:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
            rest = re.sub(r"^(attn[12])\.([qkvo])\.", lambda mm: f"{mm.group(1)}.{_PROJ[mm.group(2)]}.", rest)
            k = f"blocks.{i}.{rest}"
        out[k] = v
    return out


def config_from_state_dict(sd: dict, num_heads: int | None = None, head_dim: int = 128) -> dict:
    """WanTransformer3DModel kwargs inferred from converted weights (heads from ``head_dim``)."""
    try:
        pe = sd["patch_embedding.weight"]
        layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        dim = pe.shape[0]
        kw = dict(
            patch_size=tuple(pe.shape[2:]), in_channels=pe.shape[1], num_layers=layers,
            out_channels=sd["proj_out.weight"].shape[0] // (pe.shape[2] * pe.shape[3] * pe.shape[4]),
            text_dim=sd["condition_embedder.text_embedder.linear_1.weight"].shape[1],
            freq_dim=sd["condition_embedder.time_embedder.linear_1.weight"].shape[1],
            ffn_dim=sd["blocks.0.ffn.net.0.proj.weight"].shape[0],
            cross_attn_norm="blocks.0.norm2.weight" in sd,
        )
    except KeyError as e:
        raise ValueError(f"not a Wan transformer state dict: missing {e}") from None
    heads = num_heads or dim // head_dim
    if dim % heads:
        raise ValueError(f"num_heads={heads} does not divide the model width {dim}")
    kw.update(num_attention_heads=heads, attention_head_dim=dim // heads)
    return kw


def load_self_forcing(path: str | os.PathLike, num_heads: int | None = None, use_ema: bool = True,
                      torch_dtype: torch.dtype = torch.bfloat16, config=None, head_file: str | None = None):
    """Build an :class:`ARVideoPipeline` from a local ``.pt``/``.pth``/``.safetensors`` checkpoint."""
    from diffusers import WanTransformer3DModel

    from dcache.pipelines.ar_video.pipeline import ARVideoConfig, ARVideoPipeline

    path = os.fspath(path)
    if os.path.isdir(path):
        cands = sorted(f for f in os.listdir(path) if f.endswith((".pt", ".pth", ".safetensors")))
        if not cands:
            raise ValueError(f"no .pt/.pth/.safetensors checkpoint in {path!r}")
        path = os.path.join(path, cands[0])
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path!r} does not exist (only local files are read)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        raw = load_file(path)
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    sd = convert_state_dict(raw, use_ema)
    kw = config_from_state_dict(sd, num_heads)
    with torch.device("meta"):
        model = WanTransformer3DModel(**kw)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match WanTransformer3DModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.rope = type(model.rope)(kw["attention_head_dim"], kw["patch_size"], 1024)  # buffers were on meta
    model = model.to(torch_dtype).eval()
    return ARVideoPipeline(model, config or ARVideoConfig(), head_file=head_file)
