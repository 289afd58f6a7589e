"""Flow-map maths in unit time (docs/method.md §1–§5).

Conventions: ``t = 1`` is pure noise, ``t = 0`` is data; tensors are ``[B, C, F, H, W]``.
Times are *unit* time everywhere in this module; the ×1000 scale exists only at the
network boundary (:func:`anyflow.sampling.call_model`).

    forward process      x_t = (1 − t)·x_0 + t·ε,     v = ε − x_0
    shift (Wan / SD3)    shift(σ) = s·σ / (1 + (s − 1)·σ)
    flow-map step        x_r = x_t − (t − r)·u(x_t, t, r)
    x0-prediction        x̂_0 = x_t − t·v
"""

from __future__ import annotations

import torch
from torch import Tensor

TIME_WEIGHTS = ("beta08", "uniform", "gaussian")


def shift(sigma: Tensor | float, s: float) -> Tensor | float:
    """Time shift ``s·σ / (1 + (s − 1)·σ)``; ``s = 1`` is the identity, ``s > 1`` spends more time near noise."""
    return s * sigma / (1 + (s - 1) * sigma)


def schedule(nfe: int, s: float = 1.0, *, device=None, dtype=torch.float32) -> Tensor:
    """The ``nfe + 1`` sampling times ``τ_0 = 1 > τ_1 > … > τ_K = 0``: uniform in [1, 0], then shifted."""
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}; use nfe=1 or more.")
    tau = torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)
    return shift(tau, s).to(device=device, dtype=dtype)


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast per-sample times ``[B]`` (or per-frame ``[B, F]``) against ``x`` of shape ``[B, C, F, H, W]``."""
    if t.ndim == 1:
        return t.view(-1, 1, 1, 1, 1).to(x.dtype)
    if t.ndim == 2:
        return t[:, None, :, None, None].to(x.dtype)
    raise ValueError(f"times must be [B] or [B, F], got shape {tuple(t.shape)}")


def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Rectified-flow forward process ``x_t = (1 − t)·x_0 + t·ε``."""
    tt = expand_like(t, x0)
    return (1 - tt) * x0 + tt * noise


def velocity(x0: Tensor, noise: Tensor) -> Tensor:
    """Conditional velocity of the straight path, ``v = ε − x_0``."""
    return noise - x0


def flow_map_step(x_t: Tensor, u: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """Flow-map jump ``x_r = x_t − (t − r)·u(x_t, t, r)``."""
    return x_t - expand_like(t - r, x_t) * u


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """x0-prediction ``x̂_0 = x_t − t·v`` (the flow-map jump to r = 0)."""
    return x_t - expand_like(t, x_t) * v


def logit_normal(n: int, *, mean: float = 0.0, std: float = 1.0, generator=None, device=None) -> Tensor:
    """``t = sigmoid(z)``, ``z ~ N(mean, std²)``: the SD3 training-time density."""
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float64) * std + mean
    return torch.sigmoid(z).float()


def _raw_time_weight(t: Tensor, kind: str) -> Tensor:
    if kind == "beta08":
        return t * (1 - t).clamp_min(0).sqrt()
    if kind == "uniform":
        return torch.ones_like(t)
    if kind == "gaussian":
        return torch.exp(-2 * (t - 0.5) ** 2)
    raise ValueError(f"unknown time weight {kind!r}; choose one of {', '.join(TIME_WEIGHTS)}.")


def time_weight(t: Tensor, kind: str = "beta08", s: float = 1.0) -> Tensor:
    """Per-sample loss weight ``w(t)`` evaluated at the (already shifted) time ``t``.

    Normalised so that its mean over the shifted 1001-point grid ``shift(linspace(0, 1, 1001))`` is 1.
    ``beta08`` ∝ t·(1 − t)^0.5, ``gaussian`` ∝ exp(−2(t − 0.5)²), ``uniform`` = 1.
    """
    grid = shift(torch.linspace(0, 1, 1001, dtype=torch.float64), s)
    norm = _raw_time_weight(grid, kind).mean()
    return (_raw_time_weight(t.double(), kind) / norm).to(t.dtype)


def split_counts(global_batch: int, diffusion_ratio: float, consistency_ratio: float) -> tuple[int, int]:
    """Numbers of samples of a global batch that get ``r = t`` (diffusion) and ``r = 0`` (consistency)."""
    for name, value in (("diffusion_ratio", diffusion_ratio), ("consistency_ratio", consistency_ratio)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} is outside [0, 1]; pick a fraction of the batch between 0 and 1.")
    if diffusion_ratio + consistency_ratio > 1.0 + 1e-9:
        raise ValueError(
            f"diffusion_ratio + consistency_ratio = {diffusion_ratio + consistency_ratio:g} exceeds 1; "
            "lower one of them so that they sum to at most 1."
        )
    n_diff = round(diffusion_ratio * global_batch)
    n_cons = min(round(consistency_ratio * global_batch), global_batch - n_diff)
    return n_diff, n_cons


def rank_positions(batch_size: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """The global-batch positions a rank holds: ``rank, rank + W, rank + 2W, …`` (``batch_size`` of them).

    Dealing the global batch out like cards spreads any run of consecutive positions (e.g. the diffusion
    samples) evenly: every rank gets ``⌊n/W⌋`` or ``⌈n/W⌉`` of them, the same count when ``W`` divides ``n``.
    """
    return torch.arange(rank, batch_size * world_size, world_size)


def sample_t_r(
    batch_size: int,
    *,
    diffusion_ratio: float = 0.5,
    consistency_ratio: float = 0.25,
    s: float = 1.0,
    rank: int = 0,
    world_size: int = 1,
    generator: torch.Generator | None = None,
    device=None,
) -> tuple[Tensor, Tensor]:
    """Draw the pretrain times ``(t, r)`` for this rank's ``batch_size`` samples (docs/method.md §5.1).

    ``a, b ~ U(0, 1)``, ``t = max(a, b)``, ``r = min(a, b)`` for the ``N = batch_size·world_size`` positions of
    the global batch; the first ``round(diffusion_ratio·N)`` positions get ``r = t`` and the next
    ``round(consistency_ratio·N)`` get ``r = 0``. Both are then shifted. ``generator`` must be seeded
    identically on all ranks: the whole global batch is drawn and this rank keeps the positions of
    :func:`rank_positions`, so every rank holds the same mix of diffusion, consistency and general samples
    (in that order) and no rank waits for one that holds all the expensive ones.
    """
    n = batch_size * world_size
    n_diff, n_cons = split_counts(n, diffusion_ratio, consistency_ratio)
    ab = torch.rand(2, n, generator=generator, dtype=torch.float64)
    t, r = ab.max(0).values, ab.min(0).values
    r[:n_diff] = t[:n_diff]
    r[n_diff : n_diff + n_cons] = 0.0
    t, r = shift(t, s), shift(r, s)
    mine = rank_positions(batch_size, rank, world_size)
    return t[mine].float().to(device), r[mine].float().to(device)


def dist_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else torch.distributed's when initialised, else ``(0, 1)``."""
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    return rank, world_size


def derivative_times(t: Tensor, delta: float, r: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The central-difference pair ``(t − δ, t + δ)``, using the interval that stays inside [0, 1] and, given
    ``r``, inside the flow map's domain ``t' ≥ r``."""
    low = (t - delta).clamp(0.0, 1.0)
    if r is not None:
        low = torch.maximum(low, r)
    return low, (t + delta).clamp(0.0, 1.0)


def mean_flow_target(v: Tensor, t: Tensor, r: Tensor, dudt: Tensor) -> Tensor:
    """MeanFlow identity ``u(x_t, t, r) = v − (t − r)·dU/dt``."""
    return v - expand_like(t - r, v) * dudt


def to_network_time(t: Tensor) -> Tensor:
    """Unit time → Wan's 0..1000 timestep scale (the only place the factor appears)."""
    return t * 1000.0

