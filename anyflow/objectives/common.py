"""Pieces shared by the flow-matching objectives: text dropout, guidance fusion, weighted per-sample MSE."""

from __future__ import annotations

import torch
from torch import Tensor


def drop_text(prompt_embeds: Tensor, negative_embeds: Tensor | None, ratio: float,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Replace each sample's prompt embedding by the negative one with probability ``ratio``.

    Returns the embeddings and the boolean mask of dropped samples.
    """
    batch = prompt_embeds.shape[0]
    if ratio <= 0:
        return prompt_embeds, torch.zeros(batch, dtype=torch.bool, device=prompt_embeds.device)
    if negative_embeds is None:
        raise ValueError("drop_text_ratio > 0 needs negative_embeds (the negative-prompt embedding).")
    device = generator.device if generator is not None else prompt_embeds.device
    dropped = (torch.rand(batch, generator=generator, device=device) < ratio).to(prompt_embeds.device)
    negative = negative_embeds.expand_as(prompt_embeds)
    return torch.where(dropped.view(-1, 1, 1), negative, prompt_embeds), dropped


def fuse_guidance(u_cond: Tensor, u_uncond: Tensor, w: Tensor) -> Tensor:
    """Guidance fusion (docs/method.md §5.4): the conditional field implied by a guided prediction,
    ``(u_θ(c) − (1 − w)·u_∅) / w``, with per-sample ``w`` ``[B]``."""
    w = w.view(-1, *([1] * (u_cond.ndim - 1))).to(u_cond.dtype)
    return (u_cond - (1 - w) * u_uncond) / w


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Gaussian noise shaped like ``x``, drawn on the generator's device."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over ranks when torch.distributed is initialised (identity otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all elements of each sample: ``[B]``."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def guidance_weights(batch: int, guidance_scale: float | None, dropped: Tensor) -> Tensor | None:
    """Per-sample fusion scale ``w`` (1 for text-dropped samples, which learn the unconditional field)."""
    if guidance_scale is None:
        return None
    if guidance_scale <= 0:
        raise ValueError(f"fuse_guidance_scale={guidance_scale} must be positive (e.g. 3.0), or null for off.")
    w = torch.full((batch,), float(guidance_scale), device=dropped.device)
    return torch.where(dropped, torch.ones_like(w), w)


def condition(prompt_embeds: Tensor, negative_embeds: Tensor | None, dropped: Tensor, *, drop_text_ratio: float,
              guidance_scale: float | None) -> tuple[Tensor, Tensor | None]:
    """Text dropout and guidance fusion for the samples ``dropped`` (``[B]`` bool, on the embeddings' device):
    dropped samples take the negative-prompt embedding, and ``w`` is the per-sample fusion scale (1 where
    dropped; None without fusion). Returns ``(embeds, w)``."""
    if drop_text_ratio > 0 and negative_embeds is None:
        raise ValueError("drop_text_ratio > 0 needs negative_embeds (the negative-prompt embedding).")
    if guidance_scale is not None and negative_embeds is None:
        raise ValueError("guidance fusion needs negative_embeds (the negative-prompt embedding).")
    embeds = prompt_embeds
    if drop_text_ratio > 0:
        embeds = torch.where(dropped.view(-1, 1, 1), negative_embeds.expand_as(prompt_embeds), prompt_embeds)
    return embeds, guidance_weights(prompt_embeds.shape[0], guidance_scale, dropped)
