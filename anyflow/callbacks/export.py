"""Export the EMA student in Diffusers format every N training iterations and at the end."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class ExportStudent(L.Callback):
    """Writes ``<dirpath>`` (atomically replaced) every ``every_n_steps`` iterations (0: only at the end)."""

    def __init__(self, dirpath: str, every_n_steps: int = 0):
        self.dirpath, self.every_n_steps = Path(dirpath), int(every_n_steps)
        self.last_step = -1

    def _export(self, trainer: L.Trainer, module) -> None:
        if trainer.global_step == self.last_step:
            return
        module.export(self.dirpath, {"run_dir": str(self.dirpath.parent)})
        self.last_step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._export(trainer, module)

    def on_train_end(self, trainer, module):
        self._export(trainer, module)
