"""Measure the data layer on this machine and print the figures the README quotes.

    python benchmarks/data_throughput.py [--clips 4] [--full-vae]

1. decode: PyAV clips/s for 81 frames at 16 fps, resized + centre-cropped to 480×832, from H.264 sources of
   1280×720 at 30 fps and 848×480 at 24 fps (6 s each), one process (a DataLoader worker does the same work);
2. precompute: clips/s of ``python -m anyflow.precompute``'s encode loop on a tiny random Wan2.1 folder
   (5 frames, 16×16: overheads only) and, with ``--full-vae``, seconds per clip (81×480×832, or ``--vae-clip F H W``)
   through the real-size Wan2.1 VAE architecture (random weights: the cost does not depend on the values);
3. memory: bytes of VAE + text encoder that ``data=latents`` does not build, on the tiny folder (measured on the
   built module) and for Wan2.1's real parts (parameter counts of the real configs, built on the meta device).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def source_clip(path: Path, seconds: float, fps: int, height: int, width: int, seed: int) -> Path:
    """A smooth moving pattern (compresses like real footage rather than like noise), H.264 via imageio."""
    import imageio.v3 as iio

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6, 3)
    frames = []
    for t in range(int(seconds * fps)):
        channels = [np.sin((x + 3 * t) / (40 + 9 * c) + phase[c]) * np.cos((y - 2 * t) / (30 + 7 * c)) for c in range(3)]
        frames.append((127.5 + 110 * np.stack(channels, -1)).astype(np.uint8))
    iio.imwrite(path, np.stack(frames), fps=fps, codec="libx264", plugin="FFMPEG")
    return path


def bench_decode(folder: Path, clips: int) -> None:
    from anyflow.data.videos import decode_clip

    torch.set_num_threads(1)
    for name, (seconds, fps, h, w) in {"1280x720@30fps": (6, 30, 720, 1280), "848x480@24fps": (6, 24, 480, 848)}.items():
        paths = [source_clip(folder / f"{name}_{i}.mp4", seconds, fps, h, w, i) for i in range(clips)]
        decode_clip(paths[0], 81, 16, 480, 832)  # warm-up
        start = time.perf_counter()
        for path in paths:
            clip = decode_clip(path, 81, 16, 480, 832)
        seconds_per_clip = (time.perf_counter() - start) / clips
        assert clip.shape == (3, 81, 480, 832)
        print(f"[decode] {name} source → 81×480×832 at 16 fps: {1 / seconds_per_clip:.2f} clips/s per process "
              f"({seconds_per_clip:.2f} s/clip, {clips} clips)")


def bench_precompute_tiny(folder: Path, clips: int) -> None:
    from anyflow.precompute import precompute
    from conftest import compose_cfg
    from tiny_videos import make_clip_folder
    from tiny_wan import make_plain_wan

    wan = make_plain_wan(folder / "wan")
    data = folder / "tiny_clips"
    make_clip_folder(data, good=clips * 4)
    cfg = compose_cfg("precompute", [f"model.path={wan}", f"data.path={data}", "data.num_frames=5", "data.height=16",
                                     "data.width=16", "data.num_workers=0", f"out={folder / 'cache'}", "progress=false",
                                     "shard_size=8"])
    start = time.perf_counter()
    meta = precompute(cfg)
    seconds = time.perf_counter() - start
    print(f"[precompute] tiny Wan folder, 5×16×16 clips: {meta['num_samples'] / seconds:.2f} clips/s end to end "
          f"({meta['num_samples']} clips in {seconds:.1f} s, model loading included)")


def bench_full_vae(frames: int = 81, height: int = 480, width: int = 832) -> None:
    from diffusers import AutoencoderKLWan

    from anyflow.models.autoencoder import WanAutoencoder

    torch.set_num_threads(max(1, torch.get_num_threads()))
    torch.manual_seed(0)
    vae = AutoencoderKLWan(latents_mean=[0.0] * 16, latents_std=[1.0] * 16)  # Wan2.1's architecture (defaults)
    autoencoder = WanAutoencoder(vae)
    clip = torch.rand(1, 3, frames, height, width) * 2 - 1
    start = time.perf_counter()
    latents = autoencoder.encode(clip)
    seconds = time.perf_counter() - start
    print(f"[precompute] real-size Wan2.1 VAE encoder, one {frames}×{height}×{width} clip on {torch.get_num_threads()} "
          "CPU threads: "
          f"{seconds:.1f} s/clip ({1 / seconds:.4f} clips/s); latents {list(latents.shape)}")


def bench_memory(folder: Path) -> None:
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from anyflow.train import build_module
    from conftest import compose_cfg
    from tiny_wan import make_plain_wan

    wan = folder / "wan" if (folder / "wan").is_dir() else make_plain_wan(folder / "wan")
    cfg = compose_cfg("train", ["stage=teacher", "model=wan2.1_t2v_1.3b", f"model.path={wan}", "data=videos",
                                "data.path=unused", "data.num_frames=5", "data.height=16", "data.width=16"],
                      run_dir=folder / "run")
    module = build_module(cfg)

    def nbytes(part) -> int:
        return sum(t.numel() * t.element_size() for t in [*part.parameters(), *part.buffers()])

    vae, text = nbytes(module.autoencoder), nbytes(module.text_encoder)
    print(f"[memory] tiny Wan folder: data=latents does not build VAE {vae / 2**20:.2f} MiB + text encoder "
          f"{text / 2**20:.2f} MiB = {(vae + text) / 2**20:.2f} MiB per process")
    with torch.device("meta"):
        real_vae = sum(p.numel() for p in AutoencoderKLWan().parameters())
        umt5 = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                          feed_forward_proj="gated-gelu")
        real_text = sum(p.numel() for p in UMT5EncoderModel(umt5).parameters())
    print(f"[memory] Wan2.1 real parts (parameter counts of the real configs): VAE {real_vae / 1e6:.1f} M params "
          f"= {real_vae * 4 / 2**30:.2f} GiB in fp32, UMT5-XXL encoder {real_text / 1e9:.2f} B params "
          f"= {real_text * 2 / 2**30:.2f} GiB in bf16: {(real_vae * 4 + real_text * 2) / 2**30:.1f} GiB per GPU not held")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--full-vae", action="store_true", help="also time the real-size VAE (minutes on a CPU)")
    parser.add_argument("--vae-clip", type=int, nargs=3, default=(81, 480, 832), metavar=("F", "H", "W"),
                        help="clip size for --full-vae (default 81 480 832)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bench_decode(folder, args.clips)
        bench_precompute_tiny(folder, args.clips)
        bench_memory(folder)
        if args.full_vae:
            bench_full_vae(*args.vae_clip)


if __name__ == "__main__":
    main()
