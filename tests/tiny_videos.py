"""Tiny video folders and WebDataset shards written in tests (imageio for the mp4 files, webdataset's TarWriter
for the tars), and a callback that records the prompts of every training batch."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import lightning as L
import numpy as np


def write_clip(path: Path, frames: np.ndarray, fps: float = 16) -> Path:
    """``frames`` uint8 ``[F, H, W, 3]`` (H, W multiples of 16) as an H.264 mp4."""
    iio.imwrite(path, frames, fps=fps, codec="libx264", plugin="FFMPEG")
    return path


def pattern(index: int, frames: int = 12, height: int = 32, width: int = 48) -> np.ndarray:
    """A smooth moving pattern, different for every ``index``."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = np.arange(frames, dtype=np.float32).reshape(-1, 1, 1)
    channels = [np.sin((x + 2 * t) / (4 + index) + c) * np.cos((y - t) / (5 + c)) for c in range(3)]
    return (127.5 + 100 * np.stack(channels, -1)).clip(0, 255).astype(np.uint8)


def make_clip_folder(folder: Path, good: int = 4, frames: int = 12) -> dict:
    """``good`` clips, a truncated file, a clip of 3 frames and a caption pointing at a missing file, listed in
    ``captions.jsonl`` (in that order). Returns the names."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(good):
        write_clip(folder / f"clip{i}.mp4", pattern(i, frames))
        records.append({"video": f"clip{i}.mp4", "caption": f"clip number {i}"})
    data = (folder / "clip0.mp4").read_bytes()
    (folder / "broken.mp4").write_bytes(data[: len(data) // 2])
    write_clip(folder / "short.mp4", pattern(9, 3))
    records += [{"video": "broken.mp4", "caption": "a truncated file"},
                {"video": "short.mp4", "caption": "a clip that is too short"},
                {"video": "gone.mp4", "caption": "a file that does not exist"}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"good": [f"clip{i}.mp4" for i in range(good)], "captions": [f"clip number {i}" for i in range(good)]}


def pack_shards(folder: Path, names: list[str], captions: list[str], out: Path, per_shard: int = 2) -> Path:
    """The clips as official-layout tar shards (``key.mp4`` + ``key.json`` with a ``captions`` list) and a wids
    meta JSON listing them; returns the JSON's path."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    shardlist = []
    for s in range(0, len(names), per_shard):
        url = f"shard-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(out / url)) as sink:
            for name, caption in zip(names[s:s + per_shard], captions[s:s + per_shard]):
                sink.write({"__key__": Path(name).stem, "mp4": (folder / name).read_bytes(),
                            "json": {"captions": [caption, "another caption"]}})
        shardlist.append({"url": url, "nsamples": len(names[s:s + per_shard])})
    meta = out / "wids-meta.json"
    meta.write_text(json.dumps({"wids_version": 1, "shardlist": shardlist}, indent=2))
    return meta


class RecordPrompts(L.Callback):
    """Appends ``{"step", "prompts"}`` of every training batch to a JSONL file."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": trainer.global_step, "prompts": list(batch["prompt"])}) + "\n")


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
