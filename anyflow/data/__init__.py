"""Data: procedural shapes clips (toy), video folders, WebDataset tar shards, the latent cache, and the
resumable DataModule."""

from anyflow.data.datamodule import AnyFlowDataModule, DataError, IterationStream, SkipItem, build_datamodule
from anyflow.data.latents import LatentCache
from anyflow.data.shapes import ShapesDataset
from anyflow.data.shards import TarShards
from anyflow.data.videos import VideoFolder

__all__ = ["AnyFlowDataModule", "DataError", "IterationStream", "LatentCache", "ShapesDataset", "SkipItem",
           "TarShards", "VideoFolder", "build_datamodule"]
