"""Folders of video files with captions, decoded with PyAV (FFmpeg) into training clips.

A clip of ``F`` frames at ``fps`` frames per second starts at the first frame of the file; output frame ``k``
is source frame ``⌊k · r / fps⌋`` of a file at ``r`` frames per second (frames are dropped or repeated, never
blended). Every frame is scaled by ``s = max(H / h, W / w)`` so that it covers ``H × W`` and centre-cropped,
then mapped from ``{0, …, 255}`` to ``[-1, 1]``: ``x = v / 127.5 − 1``. Items are ``{"video": [3, F, H, W],
"prompt": str}``.

Captions come from the folder's JSONL (``{"video": "a.mp4", "caption": "…"}`` per line), CSV (columns
``video,caption``) or same-name ``.txt`` files. Entries whose file or caption is missing are skipped at start
(one warning each, counted); clips that cannot be decoded or are too short are skipped when met
(:class:`~anyflow.data.datamodule.SkipItem`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import av
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from anyflow.data.datamodule import SKIPS, DataError, SkipItem

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


def frame_indices(num_frames: int, rate: float, fps: float | None) -> list[int]:
    """Source frames ``⌊k · rate / fps⌋`` for ``k < num_frames`` (consecutive frames when ``fps`` is None)."""
    if fps is None or not rate:
        return list(range(num_frames))
    return [int(math.floor(k * rate / fps + 1e-6)) for k in range(num_frames)]


def resize_crop(frame: av.VideoFrame, height: int, width: int) -> np.ndarray:
    """``[H, W, 3]`` uint8: scaled (FFmpeg's swscale, area averaging) to cover ``height × width``, centre-cropped."""
    scale = max(height / frame.height, width / frame.width)
    h, w = max(height, round(frame.height * scale)), max(width, round(frame.width * scale))
    pixels = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top:top + height, left:left + width]


def decode_clip(source: str | Path | bytes, num_frames: int, fps: float | None, height: int, width: int) -> Tensor:
    """``[3, F, H, W]`` in [-1, 1] from a video file (path or bytes); raises :class:`SkipItem` with the reason
    when the file cannot be decoded or holds too few frames."""
    name = source if not isinstance(source, bytes) else "<bytes>"
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            if not container.streams.video:
                raise SkipItem(f"{name}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            wanted = frame_indices(num_frames, rate, fps)
            picked, decoded = {}, 0
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i in wanted:
                    picked[i] = resize_crop(frame, height, width)
                if i >= wanted[-1]:
                    break
    except SkipItem:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as error:
        raise SkipItem(f"{name}: unreadable ({type(error).__name__}: {error})") from None
    if decoded <= wanted[-1]:
        seconds = f" ({decoded / rate:.2f} s at {rate:g} fps)" if rate else ""
        raise SkipItem(f"{name}: too short: {decoded} frames{seconds}, {num_frames} frames at {fps or rate:g} fps "
                       f"need {wanted[-1] + 1}")
    frames = np.stack([picked[i] for i in wanted])  # F, H, W, 3
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


def _caption(record: dict) -> str | None:
    text = record.get("caption")
    if text is None and isinstance(record.get("captions"), list) and record["captions"]:
        text = record["captions"][0]  # the official shards' JSON layout
    return text.strip() if isinstance(text, str) and text.strip() else None


def _records(folder: Path, captions: str | None) -> tuple[list[dict], str]:
    """Raw ``{"video", "caption"}`` records and where they came from."""
    if captions is None:
        found = sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.csv"))
        if len(found) > 1:
            raise DataError(f"data.path={str(folder)!r} holds several caption files ({', '.join(p.name for p in found)});"
                            " choose one with data.captions=NAME.")
        captions = found[0].name if found else None
    if captions is None:  # same-name .txt files
        videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        records = []
        for video in videos:
            text = video.with_suffix(".txt")
            records.append({"video": str(video.relative_to(folder)),
                            "caption": text.read_text(encoding="utf-8") if text.is_file() else None})
        return records, "same-name .txt files"
    file = folder / captions
    if not file.is_file():
        raise DataError(f"data.captions={captions!r} is not a file in {str(folder)!r}; name its JSONL or CSV file.")
    if file.suffix.lower() == ".csv":
        with file.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle)), file.name
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = {"video": None, "error": f"{file.name} line {number}: not JSON"}
        records.append(record if isinstance(record, dict) else {"video": None, "error": f"line {number}: not an object"})
    return records, file.name


def read_index(folder: str | Path, captions: str | None = None) -> tuple[list[tuple[Path, str]], list[str], str]:
    """``(entries, problems, source)``: usable ``(video path, caption)`` pairs, one line per rejected record,
    and the caption source."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data.path={str(folder)!r} is not a folder; point it at a folder of videos with captions.")
    records, source = _records(folder, captions)
    entries, problems = [], []
    for record in records:
        name = record.get("video") or record.get("file") or record.get("path")
        text = _caption(record)
        if not name:
            problems.append(record.get("error") or f"{source}: a record without a video name")
        elif not (folder / name).is_file():
            problems.append(f"{name}: file not found")
        elif text is None:
            problems.append(f"{name}: no caption")
        else:
            entries.append((folder / name, text))
    return entries, problems, source


class VideoFolder(Dataset):
    """Clips and captions of a folder; ``data=videos``.

    At start, missing files and captions are skipped (counted in :attr:`skipped_at_start`), and clips are probed
    in order until one decodes; a folder with no usable clip fails here with one sentence.
    """

    skips = True  # __getitem__ may raise SkipItem

    def __init__(self, path: str | Path, num_frames: int = 81, fps: float | None = 16, height: int = 480,
                 width: int = 832, captions: str | None = None):
        self.path = Path(path)
        self.num_frames, self.fps, self.height, self.width = int(num_frames), fps, int(height), int(width)
        entries, problems, where = read_index(self.path, captions)
        for problem in problems:
            SKIPS.warn(problem)
        self.entries, self.skipped_at_start = entries, len(problems)
        self.source = f"data.path={str(self.path)!r}"
        self._probe(problems, where)

    def _probe(self, problems: list[str], where: str) -> None:
        for first, (video, _) in enumerate(self.entries):
            try:
                decode_clip(video, self.num_frames, self.fps, self.height, self.width)
            except SkipItem as reason:
                SKIPS.warn(str(reason))
                problems.append(str(reason))
                continue
            self.entries = self.entries[first:]
            self.skipped_at_start += first
            return
        what = f"its {len(problems)} entries were all rejected (first: {problems[0]})" if problems else \
            f"it has no video listed ({where})"
        raise DataError(f"{self.source} has no usable clip: {what}; add videos with captions (JSONL, CSV or "
                        "same-name .txt) or fix the listed files.")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        video, caption = self.entries[index]
        clip = decode_clip(video, self.num_frames, self.fps, self.height, self.width)
        return {"video": clip, "prompt": caption}

    def key(self, index: int) -> str:
        return str(self.entries[index][0].relative_to(self.path))
