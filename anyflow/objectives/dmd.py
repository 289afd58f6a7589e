"""Distribution matching (DMD) for the on-policy stage (generator update; docs/method.md §6.3).

With ``x̂_0`` the student's sample, ``x_t`` its noised copy at ``t``, and the x0-predictions of the fake score
and of the teacher (classifier-free guided as ``cond + s·(cond − uncond)``),

    g    = (x̂_0^fake − x̂_0^real) / mean|x̂_0 − x̂_0^real|           (mean per sample; nan_to_num)
    loss = dmd_weight · MSE(x̂_0, stopgrad(x̂_0 − g))              (float64)

so that ``∂loss/∂x̂_0 = 2·dmd_weight·g / N`` (N elements): the student moves along the score difference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyflow.flow import add_noise, x0_from_velocity
from anyflow.sampling import call_model, guided


def dmd_gradient(x0_hat: Tensor, x0_fake: Tensor, x0_real: Tensor) -> Tensor:
    """``g = (x̂_0^fake − x̂_0^real) / mean|x̂_0 − x̂_0^real|`` per sample, in float64, NaNs zeroed."""
    x0_hat, x0_fake, x0_real = x0_hat.double(), x0_fake.double(), x0_real.double()
    normaliser = (x0_hat - x0_real).abs().flatten(1).mean(1).view(-1, *([1] * (x0_hat.ndim - 1)))
    return torch.nan_to_num((x0_fake - x0_real) / normaliser)


def surrogate_loss(x0_hat: Tensor, g: Tensor, weight: float = 1.0) -> Tensor:
    """``weight · MSE(x̂_0, stopgrad(x̂_0 − g))`` in float64: its gradient w.r.t. ``x̂_0`` is ``2·weight·g/N``."""
    return weight * torch.nn.functional.mse_loss(x0_hat.double(), x0_hat.detach().double() - g.detach())


def dmd_loss(x0_hat: Tensor, x0_fake: Tensor, x0_real: Tensor, weight: float = 1.0) -> Tensor:
    """``weight · MSE(x̂_0, stopgrad(x̂_0 − g))`` in float64 (gradient flows into ``x0_hat`` only)."""
    return surrogate_loss(x0_hat, dmd_gradient(x0_hat.detach(), x0_fake.detach(), x0_real.detach()), weight)


def teacher_x0(teacher, x_t: Tensor, t: Tensor, embeds: Tensor, negative_embeds: Tensor | None,
               guidance_scale: float) -> Tensor:
    """Teacher x0-prediction with CFG ``cond + s·(cond − uncond)`` (= ``uncond + (1 + s)·(cond − uncond)``, one
    batched call); ``s = 0`` is the conditional prediction alone."""
    v = guided(teacher, x_t, t, t, embeds, negative_embeds, 1.0 + guidance_scale)
    return x0_from_velocity(x_t, v, t)


def dmd_generator_loss(x0_hat: Tensor, teacher, fake_score, embeds: Tensor, *, t: Tensor, noise: Tensor,
                       negative_embeds: Tensor | None = None, weight: float = 1.0,
                       real_guidance_scale: float = 3.0) -> dict[str, Tensor]:
    """The DMD generator loss of a student sample ``x0_hat`` (keeps its graph), noised with ``noise`` at ``t``
    (the stage draws ``t ~ U(0, 1)``, shifted and clamped). Returns ``loss``, ``t``, ``g``."""
    with torch.no_grad():
        x_t = add_noise(x0_hat.detach(), noise, t)
        x0_fake = x0_from_velocity(x_t, call_model(fake_score, x_t, t, t, embeds), t)
        x0_real = teacher_x0(teacher, x_t, t, embeds, negative_embeds, real_guidance_scale)
    g = dmd_gradient(x0_hat.detach(), x0_fake, x0_real)
    return {"loss": surrogate_loss(x0_hat, g, weight), "t": t, "g": g}
