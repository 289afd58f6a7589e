"""Exponential moving average of a network's *trainable* weights, kept in fp32 (docs/method.md §7).

torch's ``AveragedModel`` copies the whole network (a frozen 14B base under LoRA included); this keeps a
shadow only of the parameters that train, as buffers of an ``nn.Module``, so that Lightning checkpoints
(and FSDP's sharded state dicts) carry it with the rest of the LightningModule.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from anyflow.models.lora import named_trainable


def _key(name: str) -> str:
    return name.replace(".", "__")


class EMA(nn.Module):
    """``θ_ema ← decay·θ_ema + (1 − decay)·θ`` after each update; ``decay = 0`` while ``step < warmup_steps``."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup_steps: int = 0):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay} must lie in [0, 1).")
        self.decay, self.warmup_steps = decay, warmup_steps
        trainable = named_trainable(model)  # a LoRA role: its adapter only
        self.names = [n for n, _ in trainable]
        for n, p in trainable:
            self.register_buffer(_key(n), p.detach().float().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._updates: int | None = None  # read from num_updates once (after a checkpoint is loaded)

    def _load_from_state_dict(self, *args, **kwargs):
        self._updates = None  # re-read the restored counter
        return super()._load_from_state_dict(*args, **kwargs)

    def _pairs(self, model: nn.Module):
        if hasattr(model, "reshard"):  # FSDP2 keeps a root module's parameters unsharded after forward
            model.reshard()
        params = dict(named_trainable(model))
        return [(getattr(self, _key(n)), params[n]) for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One EMA step; returns the decay used."""
        if self._updates is None:  # a host copy of the counter: no device sync per update
            self._updates = int(self.num_updates)
        decay = 0.0 if self._updates < self.warmup_steps else self.decay
        self._updates += 1
        shadows, params = zip(*self._pairs(model))
        torch._foreach_lerp_(list(shadows), [p.detach().float() for p in params], 1.0 - decay)
        self.num_updates += 1
        return decay

    @contextmanager
    def swapped(self, model: nn.Module):
        """Temporarily load the EMA weights into ``model`` (for sampling, validation and export)."""
        pairs = self._pairs(model)
        backup = [p.detach().clone() for _, p in pairs]
        with torch.no_grad():
            for shadow, p in pairs:
                p.copy_(shadow)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (_, p), saved in zip(pairs, backup):
                    p.copy_(saved)
