"""Lightning callbacks: atomic checkpoints, pre-emption, periodic export of the EMA student and sample videos."""

from anyflow.callbacks.checkpoint import AtomicCheckpointIO, Checkpoint
from anyflow.callbacks.export import ExportStudent
from anyflow.callbacks.preemption import Preempted, Preemption
from anyflow.callbacks.samples import SampleVideos

__all__ = ["AtomicCheckpointIO", "Checkpoint", "ExportStudent", "Preempted", "Preemption", "SampleVideos"]
