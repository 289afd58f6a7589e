"""Data: procedural shapes clips (toy), video / latent folders (Wan), and the resumable DataModule."""

from anyflow.data.datamodule import AnyFlowDataModule, IterationStream
from anyflow.data.shapes import ShapesDataset

__all__ = ["AnyFlowDataModule", "IterationStream", "ShapesDataset"]
