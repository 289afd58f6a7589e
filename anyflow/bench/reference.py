"""The references the benchmark measures against: a replica of the official trainer's flow-map loss assembly,
and a full flow-map rollout with the gradient kept at one step."""

from __future__ import annotations

import torch

from anyflow.flow import (add_noise, dist_rank_world, flow_map_step, mean_flow_target, sample_t_r, schedule,
                          time_weight, velocity)
from anyflow.objectives.common import drop_text, per_sample_mse, randn_like
from anyflow.sampling import call_model


def official_flowmap_loss(model, x0, prompt_embeds, *, negative_embeds=None, generator=None, time_generator=None,
                          diffusion_ratio=0.5, consistency_ratio=0.25, shift=1.0, delta=0.005, guidance_scale=None,
                          drop_text_ratio=0.0, weighting="beta08", rank=None, world_size=None, noise=None) -> dict:
    """The official trainer's flow-map loss assembly, re-implemented as the reference cost.

    Ranks take contiguous slices of the global split (the first ranks hold every diffusion sample); the graded
    forward runs first, then separate no-gradient forwards over *every* sample: ``u_∅`` (with fusion; dropped
    prompts too, at the same ``w``), ``u(x_t + δ·v, t + δ, r)`` and ``u(x_t − δ·v, t − δ, r)``;
    ``dU/dt = (u⁺ − u⁻) / (2δ·w)``; the rescale gathers every rank's losses and masks and indexes them.
    """
    batch = x0.shape[0]
    rank, world_size = dist_rank_world(rank, world_size)
    t, r = sample_t_r(batch * world_size, diffusion_ratio=diffusion_ratio, consistency_ratio=consistency_ratio,
                      s=shift, generator=time_generator)  # the global draw; the official code slices it per rank
    mine = slice(rank * batch, (rank + 1) * batch)
    t, r = t[mine].to(x0.device), r[mine].to(x0.device)
    noise = randn_like(x0, generator) if noise is None else noise
    embeds, _ = drop_text(prompt_embeds, negative_embeds, drop_text_ratio, generator)
    x_t, v = add_noise(x0, noise, t), velocity(x0, noise)
    prediction = call_model(model, x_t, t, r, embeds)
    w = 1.0
    if guidance_scale is not None:
        w = float(guidance_scale)
        with torch.no_grad():
            uncond = call_model(model, x_t, t, r, negative_embeds.expand_as(embeds))
        prediction = (prediction - (1 - w) * uncond) / w
    with torch.no_grad():
        plus = call_model(model, x_t + delta * v, t + delta, r, embeds)
        minus = call_model(model, x_t - delta * v, t - delta, r, embeds)
    target = mean_flow_target(v, t, r, (plus - minus) / (2 * delta * w))
    per_sample = per_sample_mse(prediction, target) * time_weight(t, weighting, shift)
    is_diffusion = t == r
    with torch.no_grad():
        losses, masks = _all_gather(per_sample.detach()), _all_gather(is_diffusion)
        scale = losses[masks].mean() / (per_sample.detach()[~is_diffusion] + 1e-5)
    per_sample[~is_diffusion] = per_sample[~is_diffusion] * scale
    return {"loss": per_sample.mean(), "per_sample": per_sample.detach(), "t": t, "r": r,
            "is_diffusion": is_diffusion, "n_diffusion": int(is_diffusion.sum())}


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def full_rollout_one_grad(model, noise, embeds, nfe: int, split: int, shift: float = 1.0):
    """All ``nfe`` flow-map steps with the gradient kept through step ``split`` only (the others run without
    gradient; the later jumps carry it on through ``x``): the alternative to the backward simulation."""
    tau = schedule(nfe, shift, device=noise.device)
    x, batch = noise, noise.shape[0]
    for i in range(nfe):
        t, r = tau[i].expand(batch), tau[i + 1].expand(batch)
        with torch.set_grad_enabled(i == split):
            u = call_model(model, x, t, r, embeds)
        x = flow_map_step(x, u, t, r)
    return x
