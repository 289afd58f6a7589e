"""AnyFlow: any-step video diffusion with flow maps (PyTorch Lightning + Hydra)."""

__version__ = "0.1.0"
