"""Lightning callbacks: periodic export of the EMA student and sample videos."""

from anyflow.callbacks.export import ExportStudent
from anyflow.callbacks.samples import SampleVideos

__all__ = ["ExportStudent", "SampleVideos"]
