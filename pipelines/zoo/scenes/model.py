"""Building blocks of the scenes model: config, word tokenizer, tiny text encoder, patch packing.

The denoiser is a pixel-space ``FluxTransformer2DModel``: RGB 32x32 images cut into 4x4 patches,
each packed into one 48-channel token (64 image tokens; Flux packs 2x2 latent patches the same
way). The text encoder is a 2-layer transformer over word ids, trained together with the denoiser;
its token states are Flux's ``encoder_hidden_states`` and its first (summary) token's state the
``pooled_projections``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .grammar import IMAGE_SIZE, MAX_WORDS, SLOTS, VOCABULARY, parse_prompt, validate_words

CONFIG_FILE = "scenes_model.json"
TRANSFORMER_FILE = "scenes_transformer.safetensors"
TEXT_ENCODER_FILE = "scenes_text_encoder.safetensors"
WEIGHT_FILES = (CONFIG_FILE, TRANSFORMER_FILE, TEXT_ENCODER_FILE)


@dataclass
class ScenesModelConfig:
    """Sizes of the scenes model. Defaults are the shipped model's.

    hidden = num_heads * head_dim; rope axes must sum to head_dim (Flux splits the head dimension
    over 3 position axes); image_size must be a multiple of patch.
    """

    image_size: int = 32
    patch: int = 4
    num_heads: int = 2
    head_dim: int = 64
    num_double_blocks: int = 2
    num_single_blocks: int = 4
    axes_dims_rope: list[int] = field(default_factory=lambda: [16, 24, 24])
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_layout: str = "slots"

    def __post_init__(self) -> None:
        if self.text_layout not in TEXT_LAYOUTS:
            raise ValueError(f"text_layout must be one of {TEXT_LAYOUTS}, got {self.text_layout!r}")
        for name in ("image_size", "patch", "num_heads", "head_dim", "text_dim", "text_layers", "text_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch {self.patch}")
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"axes_dims_rope must sum to head_dim={self.head_dim}, got {self.axes_dims_rope}")
        if self.text_dim % self.text_heads:
            raise ValueError(f"text_dim {self.text_dim} must be divisible by text_heads {self.text_heads}")

    @property
    def channels(self) -> int:
        return 3 * self.patch * self.patch

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))


TEXT_LAYOUTS = ("sequence", "slots")

# The distinct slot centres of grammar.SLOTS, in first-seen order (centre, left, right, top,
# bottom): one 3-token group each in the "slots" layout.
_GROUP_CENTRES = tuple(dict.fromkeys(c for centres in SLOTS.values() for c in centres))


def config_of(meta: dict) -> ScenesModelConfig:
    """The model config of a saved ``scenes_model.json``; files written before the slots layout
    existed have no ``text_layout`` and were trained on the word sequence."""
    return ScenesModelConfig(**{"text_layout": "sequence", **meta["model"]})


class SceneTokenizer:
    """Words of the scene vocabulary -> ids, and the text tokens' rope positions (Flux ``txt_ids``).

    Id 0 pads, id 1 is the summary token that starts every sequence; the empty sequence (summary
    token + padding) is the unconditional prompt for CFG. Two layouts:

    * ``"sequence"``: the words in prompt order, every text position (0, 0, 0), as FLUX.1 does.
    * ``"slots"`` (the shipped model): the prompt is parsed, and each object's size, colour and
      shape words go to the group of the image slot the relation puts it in (centre, left, right,
      top, bottom; ``grammar.SLOTS``), whose rope position is that slot's centre in patch units;
      the background word ends the sequence. Relation words become the layout, not tokens. This
      is layout grounding in the manner of GLIGEN (arXiv 2301.07093) and LLM-grounded diffusion
      (arXiv 2305.13655, a planner turns the prompt into boxes), done through Flux's own text
      positions: an image token near a slot attends most to the words placed there, so which
      attributes belong to which object needs no learning. The sequence-layout model had not
      learned that binding after 15k steps (its objects landed in the right slots with the colours
      swapped about half the time).

    >>> SceneTokenizer()(["a big red circle on a black background"]).shape
    torch.Size([1, 17])
    """

    PAD, SUMMARY = 0, 1

    def __init__(self, layout: str = "slots", patch: int = 4, vocabulary: tuple[str, ...] = VOCABULARY,
                 max_words: int = MAX_WORDS):
        if layout not in TEXT_LAYOUTS:
            raise ValueError(f"layout must be one of {TEXT_LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.patch = patch
        self.vocabulary = tuple(vocabulary)
        self.max_words = max_words
        self.ids = {w: i + 2 for i, w in enumerate(self.vocabulary)}
        if layout == "slots" and 2 + 3 * len(_GROUP_CENTRES) > self.length:
            raise ValueError(f"the slots layout needs {2 + 3 * len(_GROUP_CENTRES)} tokens, max_words={max_words} gives {self.length}")

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary) + 2

    @property
    def length(self) -> int:
        return self.max_words + 1

    def encode(self, prompt: str) -> list[int]:
        if self.layout == "sequence":
            ids = [self.SUMMARY] + [self.ids[w] for w in validate_words(prompt)]
            return ids + [self.PAD] * (self.length - len(ids))
        scene = parse_prompt(prompt)  # a ValueError naming the grammar and vocabulary
        ids = [self.SUMMARY] + [self.PAD] * (self.length - 1)
        for obj, centre in zip(scene.objects, SLOTS[scene.relation]):
            at = 1 + 3 * _GROUP_CENTRES.index(centre)
            ids[at:at + 3] = [self.ids[obj.size], self.ids[obj.colour], self.ids[obj.shape]]
        ids[1 + 3 * len(_GROUP_CENTRES)] = self.ids[scene.background]
        return ids

    def positions(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """(length, 3) rope positions of the text tokens (the same for every prompt, as Flux wants)."""
        pos = torch.zeros(self.length, 3, device=device, dtype=dtype)
        if self.layout == "slots":
            # slot centres are continuous pixel coordinates; patch token r spans [p*r, p*r + p)
            to_patch = lambda v: (v - self.patch / 2) / self.patch
            centre = to_patch(IMAGE_SIZE / 2)
            pos[:, 1:] = centre  # summary, background and padding: the image centre
            for k, (x, y) in enumerate(_GROUP_CENTRES):
                pos[1 + 3 * k:4 + 3 * k, 1] = to_patch(y)
                pos[1 + 3 * k:4 + 3 * k, 2] = to_patch(x)
        return pos

    def __call__(self, prompts: list[str], device=None) -> torch.Tensor:
        return torch.tensor([self.encode(p) for p in prompts], dtype=torch.long, device=device)

    def null(self, batch: int, device=None) -> torch.Tensor:
        ids = torch.full((batch, self.length), self.PAD, dtype=torch.long, device=device)
        ids[:, 0] = self.SUMMARY
        return ids


class SceneTextEncoder(ModelMixin, ConfigMixin):
    """Word ids (B, L) -> token states (B, L, dim) and pooled vector (B, dim) (the summary token)."""

    @register_to_config
    def __init__(self, vocab_size: int, max_length: int, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(max_length, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.blocks(self.embed(ids) + self.position[: ids.shape[1]]))
        return h, h[:, 0]


def build_transformer(cfg: ScenesModelConfig) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.channels,
        num_layers=cfg.num_double_blocks,
        num_single_layers=cfg.num_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.text_dim,
        pooled_projection_dim=cfg.text_dim,
        axes_dims_rope=list(cfg.axes_dims_rope),
    )


def build_text_encoder(cfg: ScenesModelConfig, tokenizer: SceneTokenizer) -> SceneTextEncoder:
    return SceneTextEncoder(tokenizer.vocab_size, tokenizer.length, cfg.text_dim, cfg.text_layers, cfg.text_heads)


def pack(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p): each p x p patch becomes one token."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.view(b, height // patch, width // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, patch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Rope positions of the image tokens: (row, col) on axes 1 and 2, as Flux does."""
    gh, gw = height // patch, width // patch
    ids = torch.zeros(gh, gw, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(gh, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(gw, device=device, dtype=dtype)[None, :]
    return ids.reshape(gh * gw, 3)
