"""Stage ``pretrain``: forward flow-map training with the MeanFlow identity (docs/method.md §5).

For ``(t, r)`` with ``r ≤ t``, ``x_t = (1 − t)·x_0 + t·ε`` and ``v = ε − x_0``, the average velocity obeys

    u(x_t, t, r) = v − (t − r)·dU/dt,
    dU/dt ≈ [u_θ(x_t + δ·v, t + δ, r) − u_θ(x_t − δ·v, t − δ, r)] / (2δ)   (no gradient, current weights)

(the one-sided interval that stays inside [0, 1] near the ends, and above ``r`` when ``t − r < δ``).
With guidance fusion at scale ``w`` the prediction in the loss is ``(u_θ(x_t,t,r|c) − (1 − w)·u_∅) / w``
and ``dU/dt`` is divided by ``w``. The loss is a per-sample MSE times ``w(t)``; samples with ``r ≠ t`` are
rescaled (scale detached) to the global mean loss of the diffusion samples (``r = t``). All no-gradient forwards of a step run as one batched call.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from anyflow.flow import (
    add_noise,
    derivative_times,
    dist_rank_world,
    expand_like,
    mean_flow_target,
    sample_t_r,
    time_weight,
    velocity,
)
from anyflow.objectives.common import all_reduce_sum, condition, fuse_guidance, per_sample_mse, randn_like
from anyflow.sampling import call_model


def no_grad_forwards(model, x_t: Tensor, v: Tensor, t: Tensor, r: Tensor, embeds: Tensor, delta: float,
                     negative_embeds: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``dU/dt`` by central difference and, when ``negative_embeds`` is given, ``u_∅(x_t, t, r)``,
    computed in **one** batched network call without gradient."""
    t_lo, t_hi = derivative_times(t, delta, r)
    x_hi = x_t + expand_like(t_hi - t, x_t) * v
    x_lo = x_t - expand_like(t - t_lo, x_t) * v
    xs, ts, rs, es = [x_hi, x_lo], [t_hi, t_lo], [r, r], [embeds, embeds]
    if negative_embeds is not None:
        xs.append(x_t), ts.append(t), rs.append(r), es.append(negative_embeds.expand_as(embeds))
    with torch.no_grad():
        out = call_model(model, torch.cat(xs), torch.cat(ts), torch.cat(rs), torch.cat(es)).chunk(len(xs))
    dudt = (out[0] - out[1]) / expand_like(t_hi - t_lo, x_t)
    return dudt, (out[2] if negative_embeds is not None else None)


def rescale_to_diffusion_mean(per_sample: Tensor, is_diffusion: Tensor,
                              all_reduce: Callable[[Tensor], Tensor] | None = None, eps: float = 1e-12) -> Tensor:
    """Rescale (scale detached) every ``r ≠ t`` sample's loss to the global mean loss of the ``r = t`` samples.

    ``all_reduce`` sums a tensor over ranks (default: torch.distributed when initialised). No rescaling when
    the global batch holds no diffusion sample.
    """
    stats = torch.stack([(per_sample.detach() * is_diffusion).sum(), is_diffusion.sum().to(per_sample.dtype)])
    stats = (all_reduce or all_reduce_sum)(stats)
    total, count = stats[0], stats[1]
    if count == 0:
        return per_sample
    scale = (total / count) / per_sample.detach().clamp_min(eps)
    return torch.where(is_diffusion, per_sample, per_sample * scale)


def flowmap_loss(model, x0: Tensor, prompt_embeds: Tensor, *, noise: Tensor | None = None, t: Tensor | None = None,
                 r: Tensor | None = None, negative_embeds: Tensor | None = None,
                 generator: torch.Generator | None = None, time_generator: torch.Generator | None = None,
                 diffusion_ratio: float = 0.5, consistency_ratio: float = 0.25, shift: float = 1.0,
                 delta: float = 0.005, guidance_scale: float | None = None, drop_text_ratio: float = 0.0,
                 weighting: str = "beta08", rank: int | None = None, world_size: int | None = None,
                 all_reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """The pretrain flow-map loss. Returns ``loss`` (batch mean) and the detached ``target``, with
    ``prediction``, ``per_sample`` (before rescaling), ``t``, ``r``, ``dudt``.

    ``generator`` draws rank-local randomness (noise, text dropout); ``time_generator`` must be seeded
    identically on all ranks (it draws the global ``(t, r)`` split; ``rank`` / ``world_size`` default to
    torch.distributed's). Pass ``t`` and ``r`` to fix the times.
    """
    batch = x0.shape[0]
    if (t is None) != (r is None):
        raise ValueError("pass both t and r, or neither.")
    if t is None:
        rank, world_size = dist_rank_world(rank, world_size)
        t, r = sample_t_r(batch, diffusion_ratio=diffusion_ratio, consistency_ratio=consistency_ratio, s=shift,
                          rank=rank, world_size=world_size, generator=time_generator, device=x0.device)
    if bool((r > t).any()):
        raise ValueError("flow-map times need r <= t for every sample.")
    if noise is None:
        noise = randn_like(x0, generator)
    embeds, w = condition(prompt_embeds, negative_embeds, drop_text_ratio=drop_text_ratio,
                          guidance_scale=guidance_scale, generator=generator)

    x_t, v = add_noise(x0, noise, t), velocity(x0, noise)
    dudt, uncond = no_grad_forwards(model, x_t, v, t, r, embeds, delta, negative_embeds if w is not None else None)
    prediction = call_model(model, x_t, t, r, embeds)
    if w is not None:
        prediction = fuse_guidance(prediction, uncond, w)
        dudt = dudt / expand_like(w, dudt)
    target = mean_flow_target(v, t, r, dudt).detach()

    per_sample = per_sample_mse(prediction, target) * time_weight(t, weighting, shift)
    is_diffusion = t == r
    loss = rescale_to_diffusion_mean(per_sample, is_diffusion, all_reduce).mean()
    return {"loss": loss, "target": target, "prediction": prediction, "per_sample": per_sample.detach(),
            "t": t, "r": r, "dudt": dudt}
