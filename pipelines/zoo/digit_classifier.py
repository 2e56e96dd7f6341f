"""A tiny CNN that reads 32x32 grey digits; used to score generated samples' class accuracy.

Train it (about a minute on one thread)::

    python -m dcache.pipelines.zoo.digit_classifier --out pipelines/zoo
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .digits_model import load_digit_images

CLASSIFIER_FILE = "digit_classifier.safetensors"
CLASSIFIER_META = "digit_classifier.json"
INPUT_SIZE = 32


class DigitClassifier(nn.Module):
    """Three conv layers and a linear head on 32x32 grey images in [0, 1].

    >>> clf = load_digit_classifier()
    >>> clf.score(pipe(class_labels=[4], output_type="np").images)  # doctest: +SKIP
    tensor([4])
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(64 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))

    @torch.no_grad()
    def score(self, images) -> torch.Tensor:
        """Predicted digit per image (int64 tensor on CPU).

        images: a list of PIL images, a numpy array (N, H, W) or (N, H, W, C), or a torch tensor
        (N, C, H, W) / (N, H, W); values in [0, 1] (PIL: 0-255). Colour is averaged to grey and
        the size resampled to 32x32.
        """
        x = to_grey_batch(images).to(next(self.parameters()).device)
        was_training = self.training
        self.eval()
        pred = self(x).argmax(dim=1).cpu()
        self.train(was_training)
        return pred


def to_grey_batch(images) -> torch.Tensor:
    """Normalise any image batch the pipeline can return into (N, 1, 32, 32) float32 in [0, 1]."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images must be a non-empty batch")
        if hasattr(images[0], "convert"):  # PIL
            arr = np.stack([np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in images])
            x = torch.from_numpy(arr).unsqueeze(1)
        else:
            x = torch.stack([torch.as_tensor(np.asarray(im)) for im in images])
            return to_grey_batch(x)
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images)).float()
        if x.ndim == 4:  # numpy images are channels-last
            x = x.permute(0, 3, 1, 2)
        elif x.ndim == 3:
            x = x.unsqueeze(1)
    elif isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.ndim == 3:
            x = x.unsqueeze(1)
    else:
        raise ValueError(f"images must be a list of PIL images, a numpy array or a torch tensor, got {type(images)}")
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise ValueError(f"images must have 1, 3 or 4 channels in a 4-d batch, got shape {tuple(x.shape)}")
    x = x[:, :3].mean(dim=1, keepdim=True)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


def load_digit_classifier(device: str | torch.device = "cpu", weights_dir: str | Path | None = None) -> DigitClassifier:
    """The shipped classifier (eval mode). Offline: reads package data only."""
    path = Path(weights_dir or Path(__file__).parent) / CLASSIFIER_FILE
    clf = DigitClassifier()
    clf.load_state_dict(load_file(str(path)))
    return clf.to(device).eval()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Random shifts of up to 2 px and mild contrast/noise, so the classifier judges shape rather
    # than the exact rendering of the training set (generated digits are rendered slightly differently).
    n = x.shape[0]
    shifts = torch.randint(-2, 3, (n, 2), generator=gen)
    out = torch.stack([torch.roll(x[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2)) for i in range(n)])
    gain = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)
    out = out * gain + 0.05 * torch.randn(out.shape, generator=gen)
    return out.clamp(0.0, 1.0)


def train(out: Path, epochs: int = 25, seed: int = 0, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digit_images(INPUT_SIZE, split="train")
    x_test, y_test = load_digit_images(INPUT_SIZE, split="test")
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    t0 = time.time()
    for _ in range(epochs):
        clf.train()
        perm = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(clf(_augment(x_train[idx], gen)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    acc = (clf.score(x_test) == y_test).float().mean().item()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(out / CLASSIFIER_FILE))
    meta = {"epochs": epochs, "seed": seed, "held_out_accuracy": acc, "held_out_images": len(y_test),
            "minutes": (time.time() - t0) / 60, "params": sum(p.numel() for p in clf.parameters())}
    (out / CLASSIFIER_META).write_text(json.dumps(meta, indent=2))
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the digit classifier used to score generated samples.")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(train(args.out, args.epochs, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
