"""Autoencoders between pixels ``[B, 3, F, H, W]`` in [-1, 1] and the latents the transformer sees."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


class IdentityAutoencoder(nn.Module):
    """Pixel space (the embedded toy): latents are the pixels."""

    def latent_shape(self, num_frames: int, height: int, width: int) -> list[int]:
        return [3, int(num_frames), int(height), int(width)]

    def video_shape(self, latent_shape: list[int]) -> list[int]:
        """``[F, H, W]`` of the clips behind latents of ``latent_shape``."""
        return list(latent_shape[1:])

    def encode(self, video: Tensor) -> Tensor:
        return video

    def decode(self, latents: Tensor) -> Tensor:
        return latents


class WanAutoencoder(nn.Module):
    """diffusers' ``AutoencoderKLWan`` with Wan's per-channel ``latents_mean`` / ``latents_std`` normalisation."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: str | torch.dtype | None = None) -> "WanAutoencoder":
        """``vae/`` of a Diffusers pipeline folder (Wan, AnyFlow or our export)."""
        from diffusers import AutoencoderKLWan

        from anyflow.config import as_dtype
        from anyflow.models.pipeline import check_pipeline_folder

        folder = check_pipeline_folder(folder, ("vae",), what="VAE folder")
        return cls(AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=as_dtype(torch_dtype)))

    def train(self, mode: bool = True):
        return super().train(False)

    def latent_shape(self, num_frames: int, height: int, width: int) -> list[int]:
        return self.latent_shape_for(self.vae.config, num_frames, height, width)

    @staticmethod
    def latent_shape_for(config, num_frames: int, height: int, width: int) -> list[int]:
        """``[z_dim, (F − 1)/4 + 1, H/8, W/8]`` for a Wan2.1 VAE ``config``; ``F − 1`` must be a multiple of 4,
        ``H`` and ``W`` of 8 (one sentence otherwise)."""
        # configs written before diffusers stored the factors lack them: Wan2.1's VAE is 4× in time, 8× in space
        temporal, spatial = config.get("scale_factor_temporal") or 4, config.get("scale_factor_spatial") or 8
        if (int(num_frames) - 1) % temporal:
            raise ValueError(f"num_frames={num_frames} does not fit the Wan VAE: num_frames − 1 must be a multiple of "
                             f"{temporal} (e.g. {(int(num_frames) - 1) // temporal * temporal + 1} or 81).")
        if int(height) % spatial or int(width) % spatial:
            raise ValueError(f"height={height}, width={width} do not fit the Wan VAE: both must be multiples of "
                             f"{spatial} (e.g. 480×832).")
        return [config["z_dim"], (int(num_frames) - 1) // temporal + 1, int(height) // spatial, int(width) // spatial]

    def video_shape(self, latent_shape: list[int]) -> list[int]:
        """``[F, H, W]`` of the clips behind latents of ``latent_shape``: ``[(F' − 1)·4 + 1, 8·H', 8·W']``."""
        temporal = self.vae.config.get("scale_factor_temporal") or 4
        spatial = self.vae.config.get("scale_factor_spatial") or 8
        _, frames, rows, cols = latent_shape
        return [(frames - 1) * temporal + 1, rows * spatial, cols * spatial]

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        latents = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode()
        return ((latents.float() - self.latents_mean) / self.latents_std).to(video.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        latents = latents.float() * self.latents_std + self.latents_mean
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float().clamp(-1, 1)
