"""The sample store of one ``dcache eval --out DIR``: files written as they finish, a manifest, resume.

Layout::

    DIR/config.json             what was asked for; a rerun with a different one is refused
    DIR/manifest-<rank>.jsonl   one line per finished sample / per measured configuration
    DIR/samples/<config>/<index>_seed<seed>.png   (video: + .mp4; the PNG holds its frames side by side)

A sample counts as finished only once its manifest line is written, and the line is written
after the file has been renamed into place, so a kill at any moment loses at most the sample in
flight (its half-written temp file is ignored and the sample is generated again). Each process
under ``accelerate launch`` appends to its own manifest; readers merge them all.

Images are stored as 8-bit PNG and every metric reads them back from disk, so a resumed or
multi-process run scores exactly the bytes a one-shot run would.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["SampleStore", "to_uint8", "save_png", "load_png", "save_mp4", "video_strip", "strip_video"]

CONFIG_FILE = "config.json"


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] → (H, W) or (H, W, 3) uint8, rounded (not truncated)."""
    x = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    if x.shape[0] == 1:
        return x[0].numpy()
    return x[:3].permute(1, 2, 0).numpy()


def save_png(image: torch.Tensor, path: str) -> None:
    from PIL import Image

    tmp = f"{path}.{os.getpid()}.tmp"
    Image.fromarray(to_uint8(image)).save(tmp, format="PNG")
    os.replace(tmp, path)  # atomic: a reader sees the whole file or none


def mp4_scale(h: int, w: int, min_side: int = 64) -> int:
    """Integer upscale of a small video's MP4 (players and VBench's networks want some pixels);
    videos whose short side is at least ``min_side`` are written at their own size."""
    return max(1, -(-min_side // max(1, min(h, w))))


def save_mp4(video: torch.Tensor, path: str, fps: int = 8, scale: int | None = None) -> None:
    """(C, F, H, W) in [0, 1] → an MP4 (mp4v, opencv) for people and VBench; lossy, so no metric
    reads it. ``scale`` (default :func:`mp4_scale`) enlarges small videos by pixel repetition."""
    import cv2

    c, f, h, w = video.shape
    scale = mp4_scale(h, w) if scale is None else scale
    tmp = f"{path}.{os.getpid()}.tmp.mp4"
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w * scale, h * scale))
    if not writer.isOpened():
        raise RuntimeError(f"opencv cannot write {path}")
    for i in range(f):
        frame = to_uint8(video[:, i])
        frame = np.repeat(frame[..., None], 3, axis=2) if frame.ndim == 2 else frame[..., ::-1]  # RGB -> BGR
        writer.write(cv2.resize(np.ascontiguousarray(frame), (w * scale, h * scale), interpolation=cv2.INTER_NEAREST))
    writer.release()
    os.replace(tmp, path)


def video_strip(video: torch.Tensor) -> torch.Tensor:
    """(C, F, H, W) → (C, H, F*W): frames side by side, stored losslessly as one PNG."""
    c, f, h, w = video.shape
    return video.permute(0, 2, 1, 3).reshape(c, h, f * w)


def strip_video(strip: torch.Tensor, frames: int) -> torch.Tensor:
    c, h, fw = strip.shape
    return strip.reshape(c, h, frames, fw // frames).permute(0, 2, 1, 3)


def load_png(path: str) -> torch.Tensor:
    """(C, H, W) float in [0, 1], C = 1 for grey files."""
    from PIL import Image

    arr = np.asarray(Image.open(path))
    t = torch.from_numpy(arr.copy()).float() / 255.0
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


def check_config(root: str, config: dict[str, Any]) -> None:
    """Refuse early (before any model is loaded) when ``root`` holds a run whose ``config`` keys differ."""
    path = os.path.join(root, CONFIG_FILE)
    if not os.path.exists(path):
        return
    old = json.load(open(path))
    diff = sorted(k for k in config if old.get(k) != config[k])
    if diff:
        raise ValueError(f"--out {root!r} holds a run with a different configuration ({', '.join(diff)} differ); "
                         f"use a new --out, or the same options to resume")


class SampleStore:
    """Finished samples of one output directory; ``rank`` names this process's manifest."""

    def __init__(self, root: str, config: dict[str, Any], rank: int = 0, create: bool = True) -> None:
        self.root = root
        self.rank = rank
        self.session = uuid.uuid4().hex[:12]  # tells timings of different invocations apart
        path = os.path.join(root, CONFIG_FILE)
        if os.path.exists(path):
            old = json.load(open(path))
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            if diff:
                raise ValueError(
                    f"--out {root!r} holds a run with a different configuration ({', '.join(diff)} differ); "
                    f"use a new --out, or the same options to resume")
        elif create:
            os.makedirs(root, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(config, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        self.config = config
        self._manifest = os.path.join(root, f"manifest-{rank}.jsonl")
        if os.path.isfile(self._manifest) and os.path.getsize(self._manifest):
            with open(self._manifest, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn line from a kill: end it so new lines stay whole
                    f.write(b"\n")

    # -- reading -----------------------------------------------------------------------------
    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete manifest line of every process (a torn last line is skipped)."""
        for path in sorted(glob.glob(os.path.join(self.root, "manifest-*.jsonl"))):
            with open(path) as f:
                for line in f:
                    if not line.endswith("\n"):
                        break  # killed mid-write: that sample was never finished
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue

    def finished(self) -> dict[tuple[str, int], dict[str, Any]]:
        """(config id, sample index) → its record, for samples whose file is present."""
        out = {}
        for r in self.records():
            if r.get("kind") == "sample" and os.path.isfile(os.path.join(self.root, r["file"])):
                out.setdefault((r["config"], r["index"]), r)
        return out

    def measured(self) -> dict[str, dict[str, Any]]:
        """config id → its FLOP/peak-memory record."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.records():
            if r.get("kind") == "measure":
                out.setdefault(r["config"], r)
        return out

    def image(self, record: dict[str, Any]) -> torch.Tensor:
        """(C, H, W) for an image sample, (C, F, H, W) for a video (read from its lossless strip)."""
        if "output" in record:
            return torch.tensor(record["output"], dtype=torch.long)
        x = load_png(os.path.join(self.root, record["file"]))
        return strip_video(x, record["frames"]) if "frames" in record else x

    # -- writing -----------------------------------------------------------------------------
    def sample_path(self, config_id: str, index: int, seed: int) -> str:
        return os.path.join("samples", config_id, f"{index:05d}_seed{seed}.png")

    def add_sample(self, config_id: str, index: int, seed: int, image: torch.Tensor, **fields: Any) -> dict:
        """Write one sample: (C, H, W) → PNG; (C, F, H, W) video → lossless PNG strip + MP4;
        integer token ids → a line of ``samples/<config>.jsonl`` (and the ids in the manifest)."""
        rel = self.sample_path(config_id, index, seed)
        if not image.is_floating_point():  # text: token ids, one JSONL line per finished sample
            rel = os.path.join("samples", f"{config_id}.jsonl")
            os.makedirs(os.path.join(self.root, "samples"), exist_ok=True)
            line = {"index": index, "seed": seed, "output": image.flatten().tolist()}
            with open(os.path.join(self.root, rel), "a") as f:
                f.write(json.dumps(line) + "\n")
            fields["output"] = line["output"]
        elif image.ndim == 4:
            os.makedirs(os.path.join(self.root, os.path.dirname(rel)), exist_ok=True)
            mp4 = rel[: -len(".png")] + ".mp4"
            fps = int(fields.pop("fps", 8))
            save_mp4(image, os.path.join(self.root, mp4), fps=fps)
            save_png(video_strip(image), os.path.join(self.root, rel))
            fields.update(frames=int(image.shape[1]), video=mp4, fps=fps)
        else:
            os.makedirs(os.path.join(self.root, os.path.dirname(rel)), exist_ok=True)
            save_png(image, os.path.join(self.root, rel))
        rec = {"kind": "sample", "config": config_id, "index": index, "seed": seed, "file": rel,
               "session": self.session, "rank": self.rank, **fields}
        self._append(rec)
        return rec

    def add_measure(self, config_id: str, **fields: Any) -> dict:
        rec = {"kind": "measure", "config": config_id, "session": self.session, "rank": self.rank, **fields}
        self._append(rec)
        return rec

    def _append(self, rec: dict[str, Any]) -> None:
        with open(self._manifest, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
