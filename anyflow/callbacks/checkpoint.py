"""``checkpoints/last.ckpt``, written atomically next to itself (never through ``$TMPDIR``).

:class:`Checkpoint` is Lightning's ``ModelCheckpoint`` with two changes:

- a checkpoint file goes through :class:`AtomicCheckpointIO` (``torch.save`` into ``.last.ckpt.tmp-…``, ``fsync``,
  ``os.replace``), which also stores a checksum of its tensors and checks it (and that the weights are finite)
  when the file is loaded;
- a distributed (FSDP2) checkpoint folder is written by all ranks into a sibling folder, which then replaces
  ``last.ckpt/`` in one step (see :mod:`anyflow.atomic`).

So a kill or a full disk during a save leaves the previous ``last.ckpt`` whole. :meth:`Checkpoint.save_now` saves
at the current iteration unless that is already done (the pre-emption callback uses it); it also runs when training
ends, so the final iteration is saved even when ``max_steps`` is no multiple of ``every_n_train_steps``.
"""

from __future__ import annotations

from pathlib import Path
from weakref import proxy

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from anyflow.atomic import clean_stale, replace_folder, sibling, write_file
from anyflow.integrity import tensor_checksum, torch_load, verify_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` next to the target, ``fsync``, rename; a checksum of the tensors is stored and verified."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options.")
        info = checkpoint.setdefault("anyflow", {})
        info["checksum"] = tensor_checksum({k: v for k, v in checkpoint.items() if k != "anyflow"})
        write_file(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """Tensors only, on the CPU (Lightning moves them); one sentence for a cut-off, foreign or pickled file."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        checkpoint = torch_load(path)
        verify_checkpoint(checkpoint, path)
        return checkpoint


def _writes_folder(trainer: L.Trainer) -> bool:
    """Whether the strategy saves a distributed checkpoint folder (FSDP2 through ModelParallelStrategy)."""
    return bool(getattr(trainer.strategy, "_save_distributed_checkpoint", False))


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` writing atomically (see the module docstring)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default: replace it
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and self.dirpath is not None:
            clean_stale(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}", own=True)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not _writes_folder(trainer):
            return super()._save_checkpoint(trainer, filepath)
        tmp = sibling(filepath)  # rank 0's name; the strategy broadcasts it
        trainer.save_checkpoint(tmp, self.save_weights_only)  # every rank writes its shards, then a barrier
        if trainer.is_global_zero:
            replace_folder(tmp, filepath)
        trainer.strategy.barrier("anyflow.checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last:  # the last iteration too, when max_steps is no multiple of every_n_train_steps
            self.save_now(trainer)
        else:
            super().on_train_end(trainer, pl_module)

    def save_now(self, trainer: L.Trainer) -> str:
        """Save ``last.ckpt`` at the current iteration (all ranks) unless it is already saved; returns its path."""
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path


__all__ = ["AtomicCheckpointIO", "Checkpoint"]
