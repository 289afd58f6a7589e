"""``python -m anyflow.precompute data=… model=… out=FOLDER``: write the latent cache that ``data=latents`` trains
from (layout: :mod:`anyflow.data.latents`).

For source item ``i`` of ``data.train`` (in order): ``latents_i = VAE.encode(clip_i)`` (normalised exactly as
training normalises them) and ``embeds_i = UMT5(caption_i)``; shard ``s`` holds the usable items among
``i ∈ [s·S, (s+1)·S)``. Under ``torchrun`` rank ``r`` of ``W`` writes the shards ``s ≡ r (mod W)``; rank 0 also
encodes the model's negative prompt once and, after all ranks are done, writes ``meta.json``. Shards are
written under a temporary name and renamed, so a rerun after a kill keeps every finished shard and redoes the
one that was being written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from anyflow.config import config_dir, register_resolvers
from anyflow.data.datamodule import SKIPS, DataError, SkipItem
from anyflow.data.latents import META, NEGATIVE, SETTINGS, atomic_save, shard_metadata, shard_name, write_shard

log = logging.getLogger("anyflow")


class Attempt(Dataset):
    """``(index, item)`` for usable items of ``dataset`` and ``(index, reason)`` for skipped ones."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        try:
            return index, self.dataset[index]
        except SkipItem as reason:
            return index, str(reason)


def settings(cfg: DictConfig, num_items: int) -> dict:
    """What determines the cache's content (loader sizes and devices do not)."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
            if k not in ("batch_size", "num_workers")}
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return {"data": data, "model": {k: model.get(k) for k in ("name", "path", "negative_prompt", "text_encoder",
                                                            "autoencoder")},
            "shard_size": int(cfg.shard_size), "num_items": num_items}


def check_settings(out: Path, wanted: dict) -> None:
    file = out / SETTINGS
    if file.is_file():
        if json.loads(file.read_text()) != wanted:
            raise DataError(f"out={str(out)!r} holds a cache written with other settings ({SETTINGS}); choose a new "
                            "folder or delete it.")
    else:
        tmp = file.with_name(file.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        os.replace(tmp, file)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def encode_shards(cfg: DictConfig, dataset: Dataset, shards: list[int], n: int, out: Path, autoencoder,
                  text_encoder, device: torch.device, progress: bool = True) -> int:
    """Encode and write ``shards``; returns the number of clips encoded."""
    size = int(cfg.shard_size)
    indices = [i for s in shards for i in range(s * size, min(n, (s + 1) * size))]
    loader = DataLoader(Attempt(dataset, indices), batch_size=None, num_workers=int(cfg.data.num_workers))
    items = iter(loader)
    key = getattr(dataset, "key", str)
    encoded = 0
    with tqdm(total=len(indices), desc="precompute", unit="clip", disable=not progress, dynamic_ncols=True) as bar:
        for shard in shards:
            latents, embeds, prompts, keys, skipped, pending = [], [], [], [], [], []

            def flush():
                if not pending:
                    return
                videos = [item["video"] for _, item in pending if "latents" not in item]
                encoded_videos = iter(autoencoder.encode(torch.stack(videos).to(device)).cpu() if videos else [])
                text = text_encoder.encode([item["prompt"] for _, item in pending]).cpu()
                for (index, item), emb in zip(pending, text):
                    latents.append(item["latents"] if "latents" in item else next(encoded_videos))
                    embeds.append(emb)
                    prompts.append(item["prompt"])
                    keys.append(key(index))
                pending.clear()

            for _ in range(shard * size, min(n, (shard + 1) * size)):
                index, item = next(items)
                if isinstance(item, str):
                    SKIPS.warn(item)
                    skipped.append(item)
                else:
                    pending.append((index, item))
                    if len(pending) == int(cfg.batch_size):
                        flush()
                bar.update(1)
            flush()
            write_shard(out / shard_name(shard), latents, embeds, prompts, keys, skipped)
            encoded += len(latents)
    return encoded


def finalize(out: Path, num_shards: int, info: dict) -> dict:
    """``meta.json`` from the shards' own metadata (rank 0, after every rank finished)."""
    entries, skipped, shape = [], [], None
    for shard in range(num_shards):
        file = out / shard_name(shard)
        if not file.is_file():
            raise DataError(f"{file} is missing: a rank stopped before finishing; run the same command again.")
        meta = shard_metadata(file)
        entries.append({"file": file.name, "num_samples": len(meta["prompts"])})
        skipped += meta["skipped"]
        if shape is None and meta["prompts"]:
            from safetensors import safe_open

            with safe_open(str(file), "pt") as handle:
                shape = handle.get_slice("latents").get_shape()[1:]
    meta = {"format": "anyflow-latent-cache", "version": 1, "num_samples": sum(e["num_samples"] for e in entries),
            "shards": entries, "latent_shape": shape, "skipped": len(skipped), **info}
    tmp = out / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, out / META)
    return meta


def precompute(cfg: DictConfig, rank: int = 0, world_size: int = 1, barrier=lambda: None) -> dict | None:
    """Write this rank's shards (and, on rank 0, the negative embedding and ``meta.json``); returns the meta on
    rank 0."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = instantiate(cfg.data.train, _convert_="all")
    n = len(dataset) if cfg.limit is None else min(len(dataset), int(cfg.limit))
    if n > 10**9:
        raise DataError(f"data={cfg.data.name} is endless ({len(dataset)} items); pass limit=N.")
    num_shards = math.ceil(n / int(cfg.shard_size))
    check_settings(out, settings(cfg, n))
    mine = range(rank, num_shards, world_size)
    for name in [shard_name(s) for s in mine] + ([NEGATIVE, META] if rank == 0 else []):
        (out / (name + ".tmp")).unlink(missing_ok=True)  # a write that was interrupted: redone below
    todo = [s for s in mine if not (out / shard_name(s)).is_file()]
    device = pick_device(cfg.device)
    text_encoder = instantiate(cfg.model.text_encoder).to(device)
    autoencoder = instantiate(cfg.model.autoencoder).to(device) if todo else None
    if rank == 0 and not (out / NEGATIVE).is_file():
        atomic_save({"negative_embeds": text_encoder.encode([cfg.model.negative_prompt]).cpu()}, out / NEGATIVE)
    if todo:
        log.info("precompute: rank %d writes %d of %d shards (%d kept from an earlier run)", rank, len(todo),
                 num_shards, len(mine) - len(todo))
    start = time.perf_counter()
    encoded = encode_shards(cfg, dataset, todo, n, out, autoencoder, text_encoder, device,
                            progress=bool(cfg.progress) and rank == 0) if todo else 0
    seconds = time.perf_counter() - start
    if encoded:
        print(f"[anyflow] precompute rank {rank}: {encoded} clips in {seconds:.1f} s ({encoded / seconds:.2f} clips/s)")
    barrier()
    if rank != 0:
        return None
    info = {"max_length": int(text_encoder.max_length), "text_dim": int(text_encoder.dim),
            "model_path": cfg.model.get("path"),
            "negative_prompt": cfg.model.negative_prompt, "source_items": n,
            "skipped_at_start": int(getattr(dataset, "skipped_at_start", 0))}
    meta = finalize(out, num_shards, info)
    print(f"[anyflow] latent cache {out}: {meta['num_samples']} items in {num_shards} shards, "
          f"{meta['skipped'] + meta['skipped_at_start']} source items skipped")
    return meta


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="precompute")
def main(cfg: DictConfig) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    try:
        if world_size == 1:
            precompute(cfg)
            return
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            precompute(cfg, dist.get_rank(), world_size, barrier=dist.barrier)
        finally:
            dist.destroy_process_group()
    except DataError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
