"""Building blocks of the reference digits model: config, class embedder, data, patch packing.

The model is a pixel-space FluxTransformer2DModel: one grey channel, 2x2 patches packed into
4-channel tokens (the same packing FluxPipeline applies to VAE latents), and the class label fed
as learned "text" tokens plus a learned pooled vector.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

NUM_CLASSES = 10
# File names of a checkpoint folder (train_digits --out, and the shipped package data).
CONFIG_FILE = "digits_model.json"
TRANSFORMER_FILE = "digits_transformer.safetensors"
EMBEDDER_FILE = "digits_class_embedder.safetensors"


@dataclass
class DigitsModelConfig:
    """Sizes of the reference model. Defaults are the shipped model's.

    hidden = num_heads * head_dim. image_size must be even (2x2 patches); rope axes must sum to
    head_dim (Flux splits the head dimension over 3 position axes).
    """

    image_size: int = 32
    num_heads: int = 2
    head_dim: int = 64
    num_double_blocks: int = 2
    num_single_blocks: int = 4
    num_text_tokens: int = 4
    text_dim: int = 64
    pooled_dim: int = 64
    axes_dims_rope: list[int] = field(default_factory=lambda: [16, 24, 24])
    num_classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % 2:
            raise ValueError(f"image_size must be a positive even number, got {self.image_size}")
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"axes_dims_rope must sum to head_dim={self.head_dim}, got {self.axes_dims_rope}")
        for name in ("num_heads", "head_dim", "num_text_tokens", "text_dim", "pooled_dim", "num_classes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def from_json(cls, path: str | Path) -> "DigitsModelConfig":
        return cls(**json.loads(Path(path).read_text()))


class DigitsClassEmbedder(ModelMixin, ConfigMixin):
    """Class label -> ("text" tokens, pooled vector) for the Flux transformer.

    Index ``num_classes`` is the learned null label used for classifier-free guidance.

    >>> emb = DigitsClassEmbedder()
    >>> tokens, pooled = emb(torch.tensor([3, 10]))   # 10 = null label
    >>> tokens.shape, pooled.shape
    (torch.Size([2, 4, 64]), torch.Size([2, 64]))
    """

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, num_tokens: int = 4, text_dim: int = 64, pooled_dim: int = 64):
        super().__init__()
        self.tokens = nn.Embedding(num_classes + 1, num_tokens * text_dim)
        self.pooled = nn.Embedding(num_classes + 1, pooled_dim)
        nn.init.normal_(self.tokens.weight, std=0.5)
        nn.init.normal_(self.pooled.weight, std=0.5)

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens(labels).view(labels.shape[0], self.config.num_tokens, self.config.text_dim)
        return tokens, self.pooled(labels)


def build_transformer(cfg: DigitsModelConfig) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=cfg.num_double_blocks,
        num_single_layers=cfg.num_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.text_dim,
        pooled_projection_dim=cfg.pooled_dim,
        axes_dims_rope=list(cfg.axes_dims_rope),
    )


def build_embedder(cfg: DigitsModelConfig) -> DigitsClassEmbedder:
    return DigitsClassEmbedder(cfg.num_classes, cfg.num_text_tokens, cfg.text_dim, cfg.pooled_dim)


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Rope positions of the image tokens: (row, col) on axes 1 and 2, as Flux does."""
    gh, gw = height // 2, width // 2
    ids = torch.zeros(gh, gw, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(gh, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(gw, device=device, dtype=dtype)[None, :]
    return ids.reshape(gh * gw, 3)


def text_ids(num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(num_tokens, 3, device=device, dtype=dtype)


def load_digit_images(size: int = 32, split: str = "all", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits upscaled (bicubic) to ``size`` x ``size``, values in [0, 1].

    split: "train" (80%), "test" (20%, stratified, fixed by ``seed``) or "all".
    Returns images (N, 1, size, size) float32 and labels (N,) int64.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    if split != "all":
        idx_train, idx_test = train_test_split(
            list(range(len(y))), test_size=0.2, random_state=seed, stratify=data.target
        )
        idx = torch.tensor(idx_train if split == "train" else idx_test)
        x, y = x[idx], y[idx]
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return x, y
