"""Stage ``teacher``: rectified-flow matching of a velocity model (docs/method.md §4).

    t ~ logit-normal(0, 1), shifted;   x_t = (1 − t)·x_0 + t·ε;   loss = w(t)·‖v_θ(x_t, t) − (ε − x_0)‖²

with the network called at ``r = t``, text dropout and optional guidance fusion as in §5.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyflow.flow import (add_noise, dist_rank_world, logit_normal, rank_positions, shift as time_shift, time_weight,
                          velocity)
from anyflow.objectives.common import condition, fuse_guidance, per_sample_mse, randn_like
from anyflow.objectives.flowmap import drop_mask
from anyflow.sampling import call_model


def flow_matching_loss(model, x0: Tensor, prompt_embeds: Tensor, *, noise: Tensor | None = None,
                       t: Tensor | None = None, negative_embeds: Tensor | None = None,
                       generator: torch.Generator | None = None,
                       time_generator: torch.Generator | None = None, shift: float = 1.0,
                       guidance_scale: float | None = None, drop_text_ratio: float = 0.0,
                       weighting: str = "uniform", rank: int | None = None,
                       world_size: int | None = None) -> dict[str, Tensor]:
    """Flow-matching loss of a velocity model. Returns ``loss``, ``target``, ``prediction``, ``t``.

    As in :func:`anyflow.objectives.flowmap_loss`, ``generator`` draws the noise when none is given and
    ``time_generator`` (seeded alike on all ranks) the global batch's times and text dropout, of which this rank
    keeps the positions of :func:`anyflow.flow.rank_positions`.
    """
    batch = x0.shape[0]
    if noise is None:
        noise = randn_like(x0, generator)
    rank, world_size = dist_rank_world(rank, world_size)
    if t is None:
        t = logit_normal(batch * world_size, generator=time_generator)[rank_positions(batch, rank, world_size)]
        t = time_shift(t, shift).to(x0.device)
    dropped = drop_mask(batch, drop_text_ratio, time_generator, rank, world_size).to(x0.device)
    embeds, w = condition(prompt_embeds, negative_embeds, dropped, drop_text_ratio=drop_text_ratio,
                          guidance_scale=guidance_scale)
    x_t, target = add_noise(x0, noise, t), velocity(x0, noise)
    prediction = call_model(model, x_t, t, t, embeds)
    if w is not None:
        with torch.no_grad():
            uncond = call_model(model, x_t, t, t, negative_embeds.expand_as(prompt_embeds))
        prediction = fuse_guidance(prediction, uncond, w)
    per_sample = per_sample_mse(prediction, target) * time_weight(t, weighting, shift)
    return {"loss": per_sample.mean(), "per_sample": per_sample.detach(), "target": target,
            "prediction": prediction, "t": t}
