"""Pieces every update loop shares: each sample's randomness, micro-batches for gradient accumulation, clipping.

**Randomness.** Every random number of a sample depends only on ``(seed, iteration, its global position)``:
tensors (noise) come from a generator of their own per sample, scalars (times, dropout) from one draw for the
whole global batch of which each rank keeps its positions (:func:`anyflow.flow.rank_positions`, the same
dealing as the data). So the same global batch gives the same update on one process, on ``W`` ranks, or with
gradient accumulation, and a resumed run continues exactly.

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

from anyflow.flow import logit_normal, rank_positions

STREAMS = {"noise": 1, "rollout": 2, "dmd_t": 3, "dmd_noise": 4, "gan_noise": 5, "critic_t": 6, "critic_noise": 7}


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (one LCG step each): distinct streams per (seed, iteration, stream, …)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (1 << 63)
    return value


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


class SampleRandom:
    """The random numbers of the ``batch`` samples of (virtual) ``rank`` of ``world_size`` at ``iteration``."""

    def __init__(self, seed: int, iteration: int, batch: int, rank: int, world_size: int, device):
        self.seed, self.iteration, self.device = int(seed), int(iteration), torch.device(device)
        self.batch, self.world_size = batch, world_size
        self.positions = rank_positions(batch, rank, world_size)

    def _generator(self, stream: str, *parts: int, device=None) -> torch.Generator:
        seed = mix_seed(self.seed, self.iteration, STREAMS[stream], *parts)
        return torch.Generator(device=device or "cpu").manual_seed(seed)

    def normal(self, stream: str, shape) -> Tensor:
        """``[batch, *shape]`` standard normal, one generator per sample (on the device)."""
        return torch.stack([torch.randn(tuple(shape), generator=self._generator(stream, p, device=self.device),
                                        device=self.device) for p in self.positions.tolist()])

    def uniform(self, stream: str) -> Tensor:
        """``[batch]`` U(0, 1): the global batch drawn at once, this rank's positions kept."""
        draw = torch.rand(self.batch * self.world_size, generator=self._generator(stream), dtype=torch.float64)
        return draw[self.positions].float().to(self.device)

    def logit_normal(self, stream: str) -> Tensor:
        """``[batch]`` sigmoid(N(0, 1)) (the SD3 training density), drawn like :meth:`uniform`."""
        draw = logit_normal(self.batch * self.world_size, generator=self._generator(stream))
        return draw[self.positions].to(self.device)


def clip(params: list[Tensor], max_norm: float | None) -> Tensor:
    """Clip to ``max_norm`` (none when 0/None); returns the norm before clipping (a full tensor under FSDP)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
