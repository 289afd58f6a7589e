"""Writing videos and contact sheets (imageio / imageio-ffmpeg through diffusers' ``export_to_video``)."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
from diffusers.utils import export_to_video
from torch import Tensor


def to_frames(video: Tensor, min_size: int = 128) -> np.ndarray:
    """``[3, F, H, W]`` in [-1, 1] → ``[F, H', W', 3]`` floats in [0, 1], upscaled (nearest) to ≥ ``min_size``."""
    frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)  # F, H, W, 3
    factor = max(1, -(-min_size // max(frames.shape[1], frames.shape[2])))
    frames = frames.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    return frames.numpy()


def write_video(video: Tensor, path: str | Path, fps: int = 8) -> Path:
    """One mp4 (H.264) per clip. Frames are floats in [0, 1]: ``export_to_video`` scales them by 255."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_to_video(list(to_frames(video)), str(path), fps=fps)
    return path


def contact_sheet(videos: Tensor, path: str | Path, pad: int = 4) -> Path:
    """PNG with one row per clip and one column per frame."""
    rows = []
    for video in videos:
        frames = to_frames(video, min_size=64)
        f, h, w, _ = frames.shape
        row = np.ones((h, f * (w + pad) - pad, 3), dtype=np.float32)
        for i in range(f):
            row[:, i * (w + pad) : i * (w + pad) + w] = frames[i]
        rows.append(row)
    width = rows[0].shape[1]
    sheet = np.ones((len(rows) * (rows[0].shape[0] + pad) - pad, width, 3), dtype=np.float32)
    for i, row in enumerate(rows):
        sheet[i * (row.shape[0] + pad) : i * (row.shape[0] + pad) + row.shape[0]] = row
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, (sheet * 255).round().astype(np.uint8))
    return path


def slugify(text: str, limit: int = 48) -> str:
    keep = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return "_".join(filter(None, keep.split("_")))[:limit] or "prompt"

