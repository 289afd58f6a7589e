"""The latent cache: precompute → data=latents gives the on-the-fly batch, builds no VAE or text encoder, resumes
after a kill to the same shards, splits shards across ranks; the preview contact sheet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import anyflow.precompute as precompute_module
from anyflow.data import AnyFlowDataModule, DataError, LatentCache, VideoFolder
from anyflow.data.latents import META, shard_name
from anyflow.precompute import precompute
from conftest import compose_cfg, run_cli
from tiny_videos import make_clip_folder

SIZE = ["data.num_frames=5", "data.height=16", "data.width=16"]


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    from tiny_wan import make_plain_wan

    return make_plain_wan(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny-Diffusers")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Four good clips listed alone (a clean folder: both paths see the same dataset), plus the bad ones unlisted."""
    folder = tmp_path_factory.mktemp("clips")
    make_clip_folder(folder, good=5)
    records = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:5]))
    return folder


def precompute_cfg(wan: Path, clips: Path, out: Path, *extra: str):
    return compose_cfg("precompute", [f"model.path={wan}", f"data.path={clips}", *SIZE, "data.num_workers=0",
                                      f"out={out}", "shard_size=2", "progress=false", *extra])


@pytest.fixture(scope="module")
def reference(wan, clips, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "reference"
    meta = precompute(precompute_cfg(wan, clips, out))
    assert meta["num_samples"] == 5 and [s["num_samples"] for s in meta["shards"]] == [2, 2, 1]
    assert meta["latent_shape"] == [4, 2, 2, 2] and meta["max_length"] == 512
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def train_cfg(tmp: Path, wan: Path, *data: str):
    return compose_cfg("train", ["stage=teacher", "model=wan2.1_t2v_1.3b", f"model.path={wan}", "trainer=cpu",
                                 "logger=none", f"paths.output_dir={tmp}", "data.batch_size=3", *data],
                       run_dir=tmp / "run")


def test_latents_give_the_on_the_fly_first_batch_without_vae_or_text_encoder(reference, wan, clips, tmp_path,
                                                                             monkeypatch):
    from anyflow.train import build_module

    videos_cfg = train_cfg(tmp_path, wan, "data=videos", f"data.path={clips}", *SIZE)
    on_the_fly = build_module(videos_cfg)
    videos = AnyFlowDataModule(VideoFolder(clips, 5, 16, 16, 16), batch_size=3, seed=0)
    x0, embeds = on_the_fly.encode_batch(next(iter(videos.train_dataloader())))

    # from the cache, neither network may even be loaded
    def refuse(*args, **kwargs):
        raise AssertionError("data=latents loaded a VAE or a text encoder")

    for target in ("anyflow.models.autoencoder.WanAutoencoder.from_pretrained",
                   "anyflow.models.text_encoder.UMT5TextEncoder.from_pretrained",
                   "diffusers.AutoencoderKLWan.from_pretrained", "transformers.UMT5EncoderModel.from_pretrained"):
        monkeypatch.setattr(target, refuse)
    cached = build_module(train_cfg(tmp_path, wan, "data=latents", f"data.path={reference}"))
    assert cached.text_encoder is None and cached.autoencoder is None
    assert cached.latent_shape == on_the_fly.latent_shape == [4, 2, 2, 2]
    latents = AnyFlowDataModule(LatentCache(reference), batch_size=3, seed=0)
    batch = next(iter(latents.train_dataloader()))
    cached_x0, cached_embeds = cached.encode_batch(batch)
    assert cached_x0.shape == x0.shape == (3, 4, 2, 2, 2) and cached_embeds.shape == embeds.shape == (3, 512, 32)
    torch.testing.assert_close(cached_x0, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached_embeds.float(), embeds.float(), rtol=0, atol=0)
    torch.testing.assert_close(cached.negative_embedding, on_the_fly.negative_embedding, rtol=0, atol=0)

    saved = sum(t.numel() * t.element_size() for part in (on_the_fly.text_encoder, on_the_fly.autoencoder)
                for t in [*part.parameters(), *part.buffers()])
    print(f"\n[memory] tiny Wan folder: data=latents does not hold {saved / 2**20:.2f} MiB of VAE + text encoder")
    assert saved > 0


def test_killed_precompute_resumes_to_the_same_shards(reference, wan, clips, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    write = precompute_module.write_shard

    def killed_on_second_shard(path, *args):
        if not (out / shard_name(0)).is_file():
            return write(path, *args)
        scratch = tmp_path / "whole.safetensors"
        write(scratch, *args)
        path.with_name(path.name + ".tmp").write_bytes(scratch.read_bytes()[: scratch.stat().st_size // 2])
        raise KeyboardInterrupt  # the process dies half-way through writing shard 1

    monkeypatch.setattr(precompute_module, "write_shard", killed_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        precompute(precompute_cfg(wan, clips, out))
    assert (out / shard_name(0)).is_file() and (out / (shard_name(1) + ".tmp")).is_file()
    assert not (out / shard_name(1)).exists() and not (out / META).exists()
    with pytest.raises(DataError, match="unfinished latent cache"):
        LatentCache(out)
    first = (out / shard_name(0)).stat()

    monkeypatch.undo()
    precompute(precompute_cfg(wan, clips, out))
    assert files(out) == files(reference)  # the same layout and bytes, the half-written shard redone
    again = (out / shard_name(0)).stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # finished shard kept


def test_ranks_write_their_own_shards(reference, wan, clips, tmp_path):
    out = tmp_path / "two_ranks"
    assert precompute(precompute_cfg(wan, clips, out), rank=1, world_size=2) is None
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(1)]
    precompute(precompute_cfg(wan, clips, out), rank=0, world_size=2)
    assert files(out) == files(reference)


def test_other_settings_are_refused(reference, wan, clips):
    with pytest.raises(DataError, match="other settings"):
        precompute(precompute_cfg(wan, clips, reference, "shard_size=3"))


def test_preview_draws_one_row_per_clip(reference, wan, clips, tmp_path):
    from PIL import Image

    from anyflow.data.preview import preview

    heights = []
    for n in (2, 4):
        path = preview(compose_cfg("preview", ["data=videos", f"data.path={clips}", *SIZE, f"n={n}", "frames=4",
                                               f"out={tmp_path}/videos{n}.png"]))
        heights.append(Image.open(path).size[1])
    assert heights[1] == 2 * heights[0]  # rows of equal height
    path = preview(compose_cfg("preview", ["model=wan2.1_t2v_1.3b", f"model.path={wan}", "data=latents",
                                           f"data.path={reference}", "n=2", f"out={tmp_path}/latents.png"]))
    assert Image.open(path).size[0] > 0


@pytest.mark.slow
def test_precompute_then_train_py_from_latents(wan, clips, tmp_path):
    out = tmp_path / "cache"
    result = run_cli("-m", "anyflow.precompute", f"model.path={wan}", f"data.path={clips}", *SIZE, f"out={out}",
                     "data.num_workers=2", "shard_size=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 items in 3 shards" in result.stdout and (out / META).is_file()
    result = run_cli("train.py", "stage=teacher", "model=wan2.1_t2v_1.3b", f"model.path={wan}", "data=latents",
                     f"data.path={out}", "trainer=cpu", "logger=none", "trainer.max_steps=2",
                     f"paths.output_dir={tmp_path}/outputs", "callbacks.samples.every_n_steps=0",
                     "~callbacks.progress", "trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "no VAE or text encoder is loaded" in output and "samples: skipped" in output
    export = next(Path(tmp_path, "outputs", "teacher").glob("*/export"))
    assert all((export / part).is_dir() for part in ("transformer", "vae", "text_encoder", "tokenizer"))
    assert json.loads((export / "anyflow.json").read_text())["max_length"] == 512


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_same_cache(reference, wan, clips, tmp_path):
    out = tmp_path / "torchrun"
    result = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                     "anyflow.precompute", f"model.path={wan}", f"data.path={clips}", *SIZE, f"out={out}",
                     "data.num_workers=0", "shard_size=2", "progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 writes 2 of 3 shards" in result.stdout and "rank 1 writes 1 of 3 shards" in result.stdout
    assert files(out) == files(reference)
