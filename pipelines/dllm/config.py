"""Configs for LLaDA- and Dream-compatible models, readable from the official ``config.json`` files.

The field names are those of the official checkpoints (LLaDA uses OLMo names such as ``d_model``;
Dream uses Qwen2 names such as ``hidden_size``), so a config round-trips through ``config.json``.
Unknown keys are kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["LLaDAConfig", "DreamConfig"]


class _ConfigIO:
    model_type: ClassVar[str] = ""
    architectures: ClassVar[list[str]] = []

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = dict(self.extra)
        out.update(d)
        out["model_type"] = self.model_type
        out.setdefault("architectures", list(self.architectures))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k != "extra"}
        extra = {k: v for k, v in d.items() if k not in names and k != "model_type"}
        return cls(**kw, extra=extra)

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, directory: str) -> Any:
        path = os.path.join(directory, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"no config.json in {directory!r}")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    # official config keys whose non-default values change the logits and that the classes do not
    # implement: key -> (accepted values, what the class does instead)
    _UNSUPPORTED: ClassVar[dict[str, tuple[tuple, str]]] = {}

    def _check_unsupported(self) -> None:
        for key, (ok, what) in self._UNSUPPORTED.items():
            if key in self.extra and self.extra[key] not in ok:
                accepted = " or ".join(repr(v) for v in ok)
                raise ValueError(f"{type(self).__name__}: {key}={self.extra[key]!r} is not implemented "
                                 f"(accepted: {accepted}; this class {what})")

    def _check_positive(self, **vals: int) -> None:
        for k, v in vals.items():
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{k} must be a positive int, got {v!r}")


@dataclass
class LLaDAConfig(_ConfigIO):
    """LLaDA (OLMo-style "llama" block) config; defaults are a tiny test model, not LLaDA-8B.

    Example::

        cfg = LLaDAConfig(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, vocab_size=32)
    """

    model_type: ClassVar[str] = "llada"
    architectures: ClassVar[list[str]] = ["LLaDAModelLM"]
    _UNSUPPORTED: ClassVar[dict[str, tuple[tuple, str]]] = {
        "scale_logits": ((False, None), "does not scale the logits"),
        "input_emb_norm": ((False, None), "does not normalise the input embeddings"),
        "layer_norm_type": (("rms", None), "uses RMSNorm"),
        "activation_type": (("silu", None), "computes silu(ff_proj(x)) * up_proj(x)"),
        "block_type": (("llama", None), "builds the 'llama' block"),
        "alibi": ((False, None), "uses no ALiBi bias"),
        "rope": ((True, None), "always applies RoPE"),
        "clip_qkv": ((None,), "does not clip q/k/v"),
        "attention_layer_norm": ((False, None), "has no q/k layer norm"),
        "layer_norm_with_affine": ((True, None), "keeps an affine weight in every norm"),
        "bias_for_layer_norm": ((False, None), "has no norm biases"),
        "multi_query_attention": ((False, None), "takes the key/value head count from n_kv_heads"),
    }

    d_model: int = 32
    n_heads: int = 4
    n_kv_heads: int | None = None
    n_layers: int = 2
    mlp_hidden_size: int = 64
    vocab_size: int = 128
    embedding_size: int | None = None
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        self._check_positive(d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                             n_layers=self.n_layers, mlp_hidden_size=self.mlp_hidden_size,
                             vocab_size=self.vocab_size)
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"d_model ({self.d_model}) must divide by n_heads ({self.n_heads}) and "
                             f"n_heads by n_kv_heads ({self.n_kv_heads})")
        if self.include_bias:
            raise ValueError("include_bias=True is not supported (no LLaDA checkpoint uses it)")
        self._check_unsupported()

    # common names used by the shared model code
    hidden_size = property(lambda s: s.d_model)
    num_attention_heads = property(lambda s: s.n_heads)
    num_key_value_heads = property(lambda s: s.n_kv_heads)
    num_hidden_layers = property(lambda s: s.n_layers)
    intermediate_size = property(lambda s: s.mlp_hidden_size)
    head_dim = property(lambda s: s.d_model // s.n_heads)
    qkv_bias = property(lambda s: s.include_qkv_bias)
    logits_shift = 0


@dataclass
class DreamConfig(_ConfigIO):
    """Dream (Qwen2 layout, bidirectional) config; defaults are a tiny test model, not Dream-7B.

    Example::

        cfg = DreamConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    """

    model_type: ClassVar[str] = "Dream"
    architectures: ClassVar[list[str]] = ["DreamModel"]
    _UNSUPPORTED: ClassVar[dict[str, tuple[tuple, str]]] = {
        "rope_scaling": ((None,), "applies plain RoPE with rope_theta"),
        "use_sliding_window": ((False, None), "attends over the whole canvas"),
    }

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    vocab_size: int = 128
    max_position_embeddings: int = 131072
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    mask_token_id: int = 151666
    pad_token_id: int = 151643
    eos_token_id: int = 151643
    bos_token_id: int = 151643
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._check_positive(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                             num_hidden_layers=self.num_hidden_layers,
                             num_attention_heads=self.num_attention_heads,
                             num_key_value_heads=self.num_key_value_heads, vocab_size=self.vocab_size)
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("hidden_size must divide by num_attention_heads and that by num_key_value_heads")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        self._check_unsupported()

    head_dim = property(lambda s: s.hidden_size // s.num_attention_heads)
    embedding_size = property(lambda s: s.vocab_size)
    qkv_bias = True
    logits_shift = 1
