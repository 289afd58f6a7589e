"""The latent cache: VAE latents and prompt embeddings written once (``python -m anyflow.precompute``), read by
``data=latents`` so that training builds neither the VAE nor the text encoder.

Layout of a cache folder (safetensors: memory-mapped, one item read without loading its shard)::

    precompute.json            the settings it was written with (a rerun with other settings is refused)
    negative.safetensors       negative_embeds [1, L, D]: the model's negative prompt, encoded once
    shard-000000.safetensors   latents        [N, C, f, h, w]  normalised VAE latents of source items s·S … s·S+S−1
                               prompt_embeds  [ΣLᵢ, D]         each prompt's embedding up to its length Lᵢ
                               prompt_lengths [N]               Lᵢ (the rows past Lᵢ are zero, so they are not stored)
                               metadata "anyflow": JSON {prompts, keys (source names), skipped (reasons)}
    …
    meta.json                  written last, so its presence marks a finished cache: shards, item counts,
                               latent_shape, max_length, text_dim, the source settings and skip counts

Shard ``s`` always holds the usable items among source items ``s·S … s·S + S − 1`` in source order, so the
layout does not depend on how many processes wrote it or on interruptions. Items read back as
``{"latents": [C, f, h, w], "prompt_embeds": [L, D] (zero-padded to max_length), "prompt": str}``.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from anyflow.data.datamodule import DataError

META, SETTINGS, NEGATIVE = "meta.json", "precompute.json", "negative.safetensors"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def prompt_length(embeds: Tensor) -> int:
    """Rows up to the last non-zero one (the text encoder zeroes every row past the prompt's tokens)."""
    rows = (embeds != 0).any(dim=-1).nonzero()
    return int(rows[-1]) + 1 if len(rows) else 0


def atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``save_file`` to a temporary name, then rename: a killed writer leaves no half-written file behind."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # readable like any other file (save_file creates it private)
    os.replace(tmp, path)


def write_shard(path: Path, latents: list[Tensor], embeds: list[Tensor], prompts: list[str], keys: list[str],
                skipped: list[str]) -> None:
    """One shard of ``len(latents)`` items (possibly none, when all of its source items were skipped)."""
    lengths = [prompt_length(e) for e in embeds]
    tensors = {
        "latents": torch.stack(latents).cpu() if latents else torch.zeros(0),
        "prompt_embeds": torch.cat([e[:n] for e, n in zip(embeds, lengths)]).cpu() if embeds else torch.zeros(0),
        "prompt_lengths": torch.tensor(lengths, dtype=torch.int64),
    }
    # one metadata entry: safetensors writes several in no fixed order, and shards must be the same bytes every time
    info = json.dumps({"prompts": prompts, "keys": keys, "skipped": skipped}, ensure_ascii=False, sort_keys=True)
    atomic_save(tensors, path, {"anyflow": info})


def shard_metadata(path: Path) -> dict:
    """``{"prompts", "keys", "skipped"}`` of a shard."""
    with safe_open(str(path), "pt") as handle:
        return json.loads(handle.metadata()["anyflow"])


def read_meta(path: str | Path) -> dict:
    """The cache's ``meta.json``; one sentence when ``path`` is not a finished cache."""
    folder = Path(path)
    if not (folder / META).is_file():
        if (folder / SETTINGS).is_file():
            raise DataError(f"data.path={str(folder)!r} is an unfinished latent cache (no {META}); run the same "
                            "python -m anyflow.precompute command again to finish it.")
        raise DataError(f"data.path={str(folder)!r} is not a latent cache (no {META}); write one with "
                        "python -m anyflow.precompute data=… model=… out=FOLDER.")
    return json.loads((folder / META).read_text())


def load_negative(path: str | Path) -> Tensor:
    """The negative-prompt embedding ``[1, L, D]`` stored with the cache."""
    return load_file(Path(path) / NEGATIVE)["negative_embeds"]


class LatentCache(Dataset):
    """Items of a finished latent cache; ``data=latents``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.source = f"data.path={str(self.path)!r}"
        shards = [s for s in self.meta["shards"] if s["num_samples"] > 0]
        if not shards:
            raise DataError(f"{self.source} holds no item: every source clip was skipped when it was written; "
                            "check the source data with python -m anyflow.data.preview.")
        self.files = [self.path / s["file"] for s in shards]
        self.lengths = [int(s["num_samples"]) for s in shards]
        self.starts = torch.tensor([0] + self.lengths[:-1]).cumsum(0).tolist()
        self.max_length = int(self.meta["max_length"])
        self.latent_shape = list(self.meta["latent_shape"])
        self.skipped_at_start = 0
        self._handles: dict[int, object] = {}
        self._prompts: dict[int, tuple[list[str], list[str], Tensor]] = {}

    def __getstate__(self):  # open file handles stay in the process that opened them
        return {**self.__dict__, "_handles": {}, "_prompts": {}}

    def __len__(self) -> int:
        return sum(self.lengths)

    def _shard(self, shard: int):
        if shard not in self._handles:
            handle = safe_open(str(self.files[shard]), "pt")
            meta = json.loads(handle.metadata()["anyflow"])
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), handle.get_tensor("prompt_lengths").cumsum(0)])
            self._handles[shard] = handle
            self._prompts[shard] = (meta["prompts"], meta["keys"], offsets)
        return self._handles[shard], self._prompts[shard]

    def locate(self, index: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def __getitem__(self, index: int) -> dict:
        shard, row = self.locate(index)
        handle, (prompts, _, offsets) = self._shard(shard)
        latents = handle.get_slice("latents")[row:row + 1][0]
        embeds = handle.get_slice("prompt_embeds")[int(offsets[row]):int(offsets[row + 1])]
        padded = embeds.new_zeros(self.max_length, embeds.shape[-1])
        padded[:len(embeds)] = embeds
        return {"latents": latents, "prompt_embeds": padded, "prompt": prompts[row]}

    def key(self, index: int) -> str:
        shard, row = self.locate(index)
        return self._shard(shard)[1][1][row]
