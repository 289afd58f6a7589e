"""Analytic stand-ins for the network: any module with the flow-map forward signature works."""

from __future__ import annotations

import torch
from torch import nn


class Analytic(nn.Module):
    """``u(x, t, r) = θ·x·t² + r`` (unit time), counting its calls."""

    def __init__(self, theta: float = 1.0):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta))
        self.calls, self.batch_sizes = 0, []

    def forward(self, hidden_states, timestep, r_timestep, encoder_hidden_states, return_dict=True, **_):
        self.calls += 1
        self.batch_sizes.append(hidden_states.shape[0])
        t = (timestep / 1000).view(-1, 1, 1, 1, 1)
        r = (r_timestep / 1000).view(-1, 1, 1, 1, 1)
        cond = encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1, 1)
        return (self.theta * hidden_states * t**2 + r + cond,)


class GaussianFlowMap(nn.Module):
    """Exact flow map of data ~ N(0, σ²) per element: ``x_r = x_t·s(r)/s(t)``, ``s(t)² = (1 − t)²σ² + t²``,
    so ``u = x_t·(1 − s(r)/s(t))/(t − r)`` (and the velocity ``x·s'(t)/s(t)`` at ``r = t``)."""

    def __init__(self, sigma: float = 0.5):
        super().__init__()
        self.sigma, self.calls = sigma, 0

    def s(self, t):
        return torch.sqrt((1 - t) ** 2 * self.sigma**2 + t**2)

    def forward(self, hidden_states, timestep, r_timestep, encoder_hidden_states, return_dict=True, **_):
        self.calls += 1
        t = (timestep.double() / 1000).view(-1, 1, 1, 1, 1)
        r = (r_timestep.double() / 1000).view(-1, 1, 1, 1, 1)
        x = hidden_states.double()
        ds = (-(1 - t) * self.sigma**2 + t) / self.s(t)
        velocity = x * ds / self.s(t)
        gap = (t - r).clamp_min(1e-12)
        average = x * (1 - self.s(r) / self.s(t)) / gap
        return (torch.where(t - r > 1e-9, average, velocity).to(hidden_states.dtype),)


class DumpTrainable:
    """A Lightning callback (built by Hydra in subprocess tests) that saves each rank's trainable weights."""

    def __new__(cls, dirpath: str):
        import lightning as L

        class _Dump(L.Callback):
            def on_train_end(self, trainer, module):
                state = {k: v.detach().cpu() for k, v in module.state_dict().items()
                         if k.startswith(("student.", "fake_score.", "ema."))}
                torch.save(state, f"{dirpath}/rank{trainer.global_rank}.pt")

        return _Dump()
