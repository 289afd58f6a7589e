"""Tar shards in the WebDataset layout, the form the official AnyFlow data ships in; ``data=webdataset``.

A shard is a tar whose members are grouped by key: ``<key>.mp4`` + ``<key>.json`` (a ``captions`` list; the
first caption is used) for videos, or ``<key>.pth`` (latents ``[C, f, h, w]``, already normalised) +
``<key>.json`` for pre-encoded data. ``data.path`` is either a wids meta JSON
(``{"wids_version": 1, "shardlist": [{"url": "a.tar", "nsamples": 100}, …]}``, relative urls resolved against
the JSON's folder) or a brace / glob pattern of tar files (``/data/shard-{000000..000099}.tar``,
``/data/*.tar``; ``::`` joins several), expanded with webdataset's own URL expansion.

Shards are read by index with ``wids`` (webdataset's indexed tar reader: one mmap and a member index per
shard), so the iteration stream can address item ``p`` directly and a resumed run is exact. The epoch order
(:meth:`TarShards.order`) shuffles the shards and then the items within each shard, so a batch touches one or
two shards and ranks and workers read different shards at any time.
"""

from __future__ import annotations

import bisect
import functools
import glob
import io
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from anyflow.data.datamodule import SKIPS, DataError, SkipItem
from anyflow.data.videos import decode_clip

WAN_TEMPORAL = 4  # frames per latent frame of Wan2.1's VAE (after the first)


def expand_pattern(pattern: str) -> list[str]:
    """Brace expansion (webdataset's) then glob; sorted within each glob."""
    from webdataset.shardlists import expand_urls

    urls = []
    for url in expand_urls(pattern):
        urls.extend(sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url])
    return urls


def read_shardlist(path: str) -> tuple[list[dict], list[str]]:
    """``([{"url", "nsamples"}, …], problems)``: the shards that exist, and one line per missing or unreadable one."""
    from wids.wids import compute_num_samples

    if str(path).endswith(".json"):
        file = Path(path)
        if not file.is_file():
            raise DataError(f"data.path={str(path)!r} does not exist; pass a wids meta JSON or a pattern of tars.")
        spec = json.loads(file.read_text())
        if not isinstance(spec, dict) or not isinstance(spec.get("shardlist"), list):
            raise DataError(f"data.path={str(path)!r} is not a wids meta JSON: it needs a \"shardlist\" of "
                            "{\"url\", \"nsamples\"} entries.")
        listed = [{"url": str(file.parent / s["url"]), "nsamples": int(s["nsamples"])} for s in spec["shardlist"]]
    else:
        listed = [{"url": url, "nsamples": None} for url in expand_pattern(str(path))]
    shards, problems = [], []
    for shard in listed:
        if not Path(shard["url"]).is_file():
            problems.append(f"{shard['url']}: shard not found")
            continue
        if shard["nsamples"] is None:
            try:
                shard["nsamples"] = compute_num_samples(shard["url"])
            except Exception as error:  # noqa: BLE001 - any tar error: skip the shard, say why
                problems.append(f"{shard['url']}: unreadable tar ({type(error).__name__}: {error})")
                continue
        if shard["nsamples"] > 0:
            shards.append(shard)
    return shards, problems


@functools.lru_cache(maxsize=8)
def open_shard(url: str):
    """One shard's member index and mmap (kept open per process, a few at a time)."""
    from wids.wids import IndexedTarSamples

    return IndexedTarSamples(path=url)


def sample_caption(sample: dict) -> str | None:
    if ".json" in sample:
        record = json.load(sample[".json"])
        texts = record.get("captions") or ([record["caption"]] if record.get("caption") else [])
        text = texts[0] if texts else None
    elif ".txt" in sample:
        text = sample[".txt"].read().decode("utf-8")
    else:
        return None
    return text.strip() if isinstance(text, str) and text.strip() else None


class TarShards(Dataset):
    """Items of WebDataset tar shards: ``{"video", "prompt"}`` from ``.mp4``, ``{"latents", "prompt"}`` from
    ``.pth``. Missing shards are skipped at start; bad items when met."""

    skips = True

    def __init__(self, path: str, num_frames: int = 81, fps: float | None = 16, height: int = 480,
                 width: int = 832):
        self.path, self.source = str(path), f"data.path={str(path)!r}"
        self.num_frames, self.fps, self.height, self.width = int(num_frames), fps, int(height), int(width)
        shards, problems = read_shardlist(self.path)
        for problem in problems:
            SKIPS.warn(problem)
        self.skipped_at_start = len(problems)
        if not shards:
            what = f"first problem: {problems[0]}" if problems else "the pattern matches no tar file"
            raise DataError(f"{self.source} has no usable shard ({what}); pass a wids meta JSON or a brace/glob "
                            "pattern of WebDataset tars.")
        self.urls = [s["url"] for s in shards]
        self.lengths = [int(s["nsamples"]) for s in shards]
        self.starts = torch.tensor([0] + self.lengths[:-1]).cumsum(0).tolist()
        self._probe()

    def _probe(self) -> None:
        """Fail at start when no item of the first usable shards can be read (decodes until one works)."""
        reasons = []
        for index in range(len(self)):
            try:
                self[index]
            except SkipItem as reason:
                reasons.append(str(reason))
                continue
            open_shard.cache_clear()  # workers open their own
            return
        raise DataError(f"{self.source} has no usable item: all {len(self)} were rejected (first: {reasons[0]}); "
                        "fix the shards or point data.path elsewhere.")

    def __len__(self) -> int:
        return sum(self.lengths)

    def locate(self, index: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def order(self, seed: int) -> torch.Tensor:
        """Shards in a seeded random order, the items of each shard in a seeded random order."""
        generator = torch.Generator().manual_seed(seed)
        shards = torch.randperm(len(self.lengths), generator=generator).tolist()
        return torch.cat([self.starts[s] + torch.randperm(self.lengths[s], generator=generator) for s in shards])

    def raw(self, index: int) -> dict:
        shard, row = self.locate(index)
        url = self.urls[shard]
        try:
            return open_shard(url)[row]
        except Exception as error:  # noqa: BLE001 - a broken tar member: skip the item, say why
            raise SkipItem(f"{url} item {row}: unreadable ({type(error).__name__}: {error})") from None

    def __getitem__(self, index: int) -> dict:
        sample = self.raw(index)
        name = f"{Path(self.urls[self.locate(index)[0]]).name}:{sample.get('__key__')}"
        try:
            caption = sample_caption(sample)
        except (ValueError, UnicodeDecodeError) as error:
            raise SkipItem(f"{name}: unreadable caption ({error})") from None
        if caption is None:
            raise SkipItem(f"{name}: no caption")
        if ".mp4" in sample:
            clip = decode_clip(sample[".mp4"].read(), self.num_frames, self.fps, self.height, self.width)
            return {"video": clip, "prompt": caption}
        if ".pth" in sample:
            return {"latents": self._latents(sample[".pth"], name), "prompt": caption}
        raise SkipItem(f"{name}: neither .mp4 nor .pth")

    def _latents(self, data: io.BytesIO, name: str) -> torch.Tensor:
        try:
            latents = torch.load(data, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise SkipItem(f"{name}: unreadable latents ({type(error).__name__})") from None
        frames = (self.num_frames - 1) // WAN_TEMPORAL + 1
        if latents.ndim != 4 or latents.shape[1] < frames:
            raise SkipItem(f"{name}: latents of shape {list(latents.shape)} hold fewer than {frames} latent frames")
        if tuple(latents.shape[2:]) != (self.height // 8, self.width // 8):
            raise SkipItem(f"{name}: latents of shape {list(latents.shape)} do not match "
                           f"{self.height}×{self.width} pixels (Wan's VAE: 8× smaller)")
        return latents[:, :frames].float()

    def key(self, index: int) -> str:
        return f"{Path(self.urls[self.locate(index)[0]]).name}:{self.raw(index).get('__key__')}"
