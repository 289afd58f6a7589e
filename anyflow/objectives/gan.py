"""Non-saturating GAN losses on discriminator logits (DMD2 style; docs/method.md §6).

    generator:      softplus(−D(fake))
    discriminator:  softplus(−D(real)) + softplus(D(fake))
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    return F.softplus(-fake_logits).mean()


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
