"""Stage ``pretrain``: forward flow-map training with the MeanFlow identity (docs/method.md §5).

For ``(t, r)`` with ``r ≤ t``, ``x_t = (1 − t)·x_0 + t·ε`` and ``v = ε − x_0``, the average velocity obeys

    u(x_t, t, r) = v − (t − r)·dU/dt,
    dU/dt ≈ [u_θ(x_t + δ·v, t + δ, r) − u_θ(x_t − δ·v, t − δ, r)] / (2δ)   (no gradient, current weights)

(the one-sided interval that stays inside [0, 1] near the ends, and above ``r`` when ``t − r < δ``).
With guidance fusion at scale ``w`` the prediction in the loss is ``(u_θ(x_t,t,r|c) − (1 − w)·u_∅) / w``
and ``dU/dt`` is divided by ``w``. The loss is a per-sample MSE times ``w(t)``; samples with ``r ≠ t`` are
rescaled (scale detached) to the global mean loss of the diffusion samples (``r = t``).

Nothing the maths multiplies by zero is computed: a diffusion sample's target is ``v`` whatever ``dU/dt`` is
(so its two derivative forwards are skipped, and ``t = r = 1``, whose difference interval is empty, cannot
produce 0/0), and a text-dropped sample has ``w = 1`` (so it needs no ``u_∅``). The remaining no-gradient
forwards of a step run as one batched call. Which rows need them is decided on the host from the times and
the dropout draw (both drawn on the CPU), so the step has no device-to-host synchronisation.
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
    rank_positions,
    sample_t_r,
    time_weight,
    velocity,
)
from anyflow.objectives.common import all_reduce_sum, condition, fuse_guidance, per_sample_mse, randn_like
from anyflow.sampling import call_model


def to_device(x: Tensor, device) -> Tensor:
    """A host tensor on ``device`` without blocking the host (pinned, asynchronous copy to a GPU)."""
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def no_grad_forwards(model, x_t: Tensor, v: Tensor, t: Tensor, r: Tensor, embeds: Tensor, delta: float,
                     negative_embeds: Tensor | None = None, *, jump: Tensor | None = None,
                     uncond: Tensor | None = None, pad: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """``dU/dt`` by central difference on the rows ``jump`` and ``u_∅(x_t, t, r)`` on the rows ``uncond``
    (default: every row; ``u_∅`` only when ``negative_embeds`` is given), in **one** network call without gradient.

    Returns ``(dudt [len(jump)], u_∅ [len(uncond)])``, ``None`` for an empty set. With no row at all the call
    is skipped, unless ``pad``: then the network still runs on one row whose answer is dropped, so that every
    rank of a sharded (FSDP) model makes the same sequence of calls.
    """
    every = torch.arange(x_t.shape[0], device=x_t.device)
    jump = every if jump is None else jump
    uncond = (every if uncond is None else uncond) if negative_embeds is not None else every[:0]
    xs, ts, rs, es = [], [], [], []
    if len(jump):
        tj, rj, xj, vj = t[jump], r[jump], x_t[jump], v[jump]
        t_lo, t_hi = derivative_times(tj, delta, rj)
        ej = embeds[jump]
        xs += [xj + expand_like(t_hi - tj, xj) * vj, xj - expand_like(tj - t_lo, xj) * vj]
        ts, rs, es = ts + [t_hi, t_lo], rs + [rj, rj], es + [ej, ej]
    if len(uncond):
        xs.append(x_t[uncond]), ts.append(t[uncond]), rs.append(r[uncond])
        es.append(negative_embeds.expand(len(uncond), *embeds.shape[1:]))
    if not xs and pad:
        xs, ts, rs, es = [x_t[:1]], [t[:1]], [r[:1]], [embeds[:1]]
    if not xs:
        return None, None
    with torch.no_grad():
        out = call_model(model, torch.cat(xs), torch.cat(ts), torch.cat(rs), torch.cat(es))
    n = len(jump)
    dudt = (out[:n] - out[n : 2 * n]) / expand_like(t_hi - t_lo, out) if n else None
    return dudt, (out[2 * n : 2 * n + len(uncond)] if len(uncond) else None)


def rescale_to_diffusion_mean(per_sample: Tensor, is_diffusion: Tensor,
                              all_reduce: Callable[[Tensor], Tensor] | None = None, eps: float = 1e-12) -> Tensor:
    """Rescale (scale detached) every ``r ≠ t`` sample's loss to the global mean loss of the ``r = t`` samples.

    ``all_reduce`` sums a tensor over ranks (default: torch.distributed when initialised). No rescaling when
    the global batch holds no diffusion sample (decided on the device: no host synchronisation).
    """
    stats = torch.stack([(per_sample.detach() * is_diffusion).sum(), is_diffusion.sum().to(per_sample.dtype)])
    stats = (all_reduce or all_reduce_sum)(stats)
    total, count = stats[0], stats[1]
    scale = (total / count.clamp_min(1)) / per_sample.detach().clamp_min(eps)
    scale = torch.where(count > 0, scale, torch.ones_like(scale))
    return torch.where(is_diffusion, per_sample, per_sample * scale)


def drop_mask(batch: int, ratio: float, generator: torch.Generator | None = None, rank: int = 0,
              world_size: int = 1) -> Tensor:
    """Which of this rank's samples lose their prompt (probability ``ratio``), on the CPU: drawn for the global
    batch from ``generator`` (seeded alike on all ranks) at the positions of :func:`rank_positions`."""
    if ratio <= 0:
        return torch.zeros(batch, dtype=torch.bool)
    draw = torch.rand(batch * world_size, generator=generator, dtype=torch.float64)
    return draw[rank_positions(batch, rank, world_size)] < ratio


def flowmap_loss(model, x0: Tensor, prompt_embeds: Tensor, *, noise: Tensor | None = None, t: Tensor | None = None,
                 r: Tensor | None = None, negative_embeds: Tensor | None = None,
                 generator: torch.Generator | None = None, time_generator: torch.Generator | None = None,
                 diffusion_ratio: float = 0.5, consistency_ratio: float = 0.25, shift: float = 1.0,
                 delta: float = 0.005, guidance_scale: float | None = None, drop_text_ratio: float = 0.0,
                 weighting: str = "beta08", rank: int | None = None, world_size: int | None = None,
                 all_reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """The pretrain flow-map loss. Returns ``loss`` (batch mean) and the detached ``target``, with
    ``prediction``, ``per_sample`` (before rescaling), ``t``, ``r``, ``dudt`` (0 on diffusion samples),
    ``is_diffusion`` and ``n_diffusion`` (a host int).

    ``generator`` draws rank-local noise; ``time_generator`` must be seeded identically on all ranks: it draws
    the global batch's ``(t, r)`` split and text dropout, of which this rank keeps its share (``rank`` /
    ``world_size`` default to torch.distributed's; gradient accumulation passes virtual ones). Pass ``t`` and
    ``r`` to fix the times. Under torch.distributed every rank makes the no-gradient call, padded to one row
    when it has nothing to compute: a sharded network all-gathers inside it.
    """
    batch = x0.shape[0]
    if (t is None) != (r is None):
        raise ValueError("pass both t and r, or neither.")
    rank, world_size = dist_rank_world(rank, world_size)
    if t is None:
        t_host, r_host = sample_t_r(batch, diffusion_ratio=diffusion_ratio, consistency_ratio=consistency_ratio,
                                    s=shift, rank=rank, world_size=world_size, generator=time_generator)
        t, r = to_device(t_host, x0.device), to_device(r_host, x0.device)
    else:
        t_host, r_host = t.detach().cpu(), r.detach().cpu()  # given times: one copy to the host
    if bool((r_host > t_host).any()):
        raise ValueError("flow-map times need r <= t for every sample.")
    if noise is None:
        noise = randn_like(x0, generator)
    dropped_host = drop_mask(batch, drop_text_ratio, time_generator, rank, world_size)
    embeds, w = condition(prompt_embeds, negative_embeds, to_device(dropped_host, x0.device),
                          drop_text_ratio=drop_text_ratio, guidance_scale=guidance_scale)

    # host-side row sets: r ≠ t needs dU/dt; with fusion, a kept prompt needs u_∅
    jump_host = (t_host != r_host).nonzero().flatten()
    jump = to_device(jump_host, x0.device)
    uncond = to_device((~dropped_host).nonzero().flatten(), x0.device) if w is not None else None
    x_t, v = add_noise(x0, noise, t), velocity(x0, noise)
    dudt_rows, uncond_rows = no_grad_forwards(model, x_t, v, t, r, embeds, delta,
                                              negative_embeds if w is not None else None, jump=jump,
                                              uncond=uncond, pad=dist_rank_world()[1] > 1)
    prediction = call_model(model, x_t, t, r, embeds)
    dudt = torch.zeros_like(v)
    if dudt_rows is not None:
        dudt = dudt.index_copy(0, jump, dudt_rows.to(v.dtype))
    if w is not None:
        u_uncond = torch.zeros_like(prediction)  # a dropped row has w = 1: its u_∅ is multiplied by 0
        if uncond_rows is not None:
            u_uncond = u_uncond.index_copy(0, uncond, uncond_rows.to(prediction.dtype))
        prediction = fuse_guidance(prediction, u_uncond, w)
        dudt = dudt / expand_like(w, dudt)
    target = mean_flow_target(v, t, r, dudt).detach()

    per_sample = per_sample_mse(prediction, target) * time_weight(t, weighting, shift)
    is_diffusion = t == r
    loss = rescale_to_diffusion_mean(per_sample, is_diffusion, all_reduce).mean()
    return {"loss": loss, "target": target, "prediction": prediction, "per_sample": per_sample.detach(),
            "t": t, "r": r, "dudt": dudt, "is_diffusion": is_diffusion, "n_diffusion": batch - len(jump_host)}
