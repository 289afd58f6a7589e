"""Losses as pure functions of networks and tensors, one module per family (DESIGN §4–§6)."""

from anyflow.objectives.flowmap import flowmap_loss
from anyflow.objectives.teacher import flow_matching_loss

__all__ = ["flow_matching_loss", "flowmap_loss"]
