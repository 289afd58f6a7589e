"""``python -m anyflow.data.preview data=…``: a contact sheet of the first training clips, as the model will see
them (after fps resampling, resize and centre crop; latents decoded by the model's VAE), one row per clip with
its caption, so that wrong frame rates, crops or black frames show up before a run starts."""

from __future__ import annotations

import textwrap
from itertools import islice
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageFont

from anyflow.config import config_dir, register_resolvers
from anyflow.data.datamodule import SKIPS, DataError, IterationStream, build_datamodule

PAD, TEXT = 4, 14  # pixels between tiles; caption font size


def frames_row(video: torch.Tensor, columns: int, min_height: int = 96) -> np.ndarray:
    """``[3, F, H, W]`` in [-1, 1] → one uint8 image of ``columns`` evenly spaced frames side by side."""
    f = video.shape[1]
    picks = np.unique(np.linspace(0, f - 1, min(columns, f)).round().astype(int))
    pixels = ((video[:, picks].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
    scale = max(1, -(-min_height // pixels.shape[1]))
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    gap = np.full((pixels.shape[1], PAD, 3), 255, np.uint8)
    return np.concatenate([x for frame in pixels for x in (frame, gap)][:-1], axis=1)


def contact_sheet(rows: list[tuple[np.ndarray, str]], path: str | Path) -> Path:
    """PNG: each row's caption above its frames."""
    font = ImageFont.load_default(size=TEXT)
    width = max(image.shape[1] for image, _ in rows)
    blocks = []
    for image, caption in rows:
        lines = textwrap.wrap(caption, max(20, width // (TEXT * 6 // 10))) or [""]
        block = Image.new("RGB", (width, len(lines) * (TEXT + 4) + PAD + image.shape[0] + 2 * PAD), "white")
        draw = ImageDraw.Draw(block)
        for i, line in enumerate(lines):
            draw.text((0, PAD + i * (TEXT + 4)), line, fill="black", font=font)
        block.paste(Image.fromarray(image), (0, len(lines) * (TEXT + 4) + PAD))
        blocks.append(block)
    sheet = Image.new("RGB", (width, sum(b.height for b in blocks)), "white")
    top = 0
    for block in blocks:
        sheet.paste(block, (0, top))
        top += block.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def preview(cfg: DictConfig) -> Path:
    """The first ``cfg.n`` items of the training order (iteration 0 onwards), drawn as a contact sheet."""
    data = build_datamodule(cfg.data, cfg.seed)
    dataset = data.train_set
    items = list(islice(iter(IterationStream(dataset, 1, seed=cfg.seed)), int(cfg.n)))
    for item in items:
        for reason in item.pop("skipped", "").splitlines():
            SKIPS.warn(reason)
    autoencoder = instantiate(cfg.model.autoencoder) if any("video" not in item for item in items) else None
    rows = []
    for item in items:
        video = item["video"] if "video" in item else autoencoder.decode(item["latents"][None].float())[0]
        f, h, w = video.shape[1:]
        rows.append((frames_row(video, int(cfg.frames)), f"{item['prompt']}   [{f} frames, {h}x{w}]"))
    path = contact_sheet(rows, cfg.out)
    print(f"[anyflow] preview of {len(rows)} clips from data={cfg.data.name}: {path}")
    return path


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="preview")
def main(cfg: DictConfig) -> None:
    try:
        preview(cfg)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
