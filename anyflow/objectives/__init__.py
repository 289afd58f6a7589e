"""Losses as pure functions of networks and tensors, one module per family (docs/method.md §4–§6)."""

from anyflow.objectives.dmd import dmd_generator_loss, dmd_gradient, dmd_loss
from anyflow.objectives.flowmap import flowmap_loss
from anyflow.objectives.gan import gan_discriminator_loss, gan_generator_loss
from anyflow.objectives.teacher import flow_matching_loss

__all__ = ["dmd_generator_loss", "dmd_gradient", "dmd_loss", "flow_matching_loss", "flowmap_loss",
           "gan_discriminator_loss", "gan_generator_loss"]
