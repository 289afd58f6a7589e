"""Pieces every update loop shares: micro-batches for gradient accumulation, and the optimizer step.

**Gradient accumulation.** An iteration's batch of ``n·B`` samples per rank (``stage.accumulate_grad_batches =
n``) is processed as ``n`` micro-batches of ``B``, each forward + backward with its loss divided by ``n``, then
one optimizer step: ``max_steps``, warm-ups and the EMA keep counting optimizer updates. Micro-batch ``m`` holds
the samples ``m, m + n, m + 2n, …`` and plays *virtual rank* ``m·W + k`` of ``n·W`` (``k``: this rank of ``W``),
so the times, the split and the dropout it draws from the shared generator are exactly those the same samples
get in one batch of ``n·B``; only the pretrain loss's diffusion-mean rescaling is taken per micro-batch (over all
ranks), since its target is known only after every diffusion sample's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MicroBatch:
    index: int  # m
    rows: slice  # the samples m, m + n, … of the iteration's batch
    rank: int  # virtual rank m·W + k
    world_size: int  # n·W
    scale: float  # 1/n: the weight of this micro-batch's loss


def micro_batches(n: int, rank: int, world_size: int) -> list[MicroBatch]:
    """The ``n`` micro-batches of an iteration on ``rank`` of ``world_size`` (see the module docstring)."""
    if n < 1:
        raise ValueError(f"stage.accumulate_grad_batches={n} must be at least 1.")
    return [MicroBatch(m, slice(m, None, n), m * world_size + rank, n * world_size, 1.0 / n) for m in range(n)]


def clip(params: list[Tensor], max_norm: float | None) -> Tensor:
    """Clip to ``max_norm`` (none when 0/None); returns the norm before clipping (a full tensor under FSDP)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
