"""Export the EMA student in Diffusers format every N training iterations and at the end."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from anyflow.atomic import clean_stale


class ExportStudent(L.Callback):
    """Writes ``<dirpath>`` (atomically replaced) every ``every_n_steps`` iterations (0: only at the end).

    ``debug``: mark the export (``"debug": true`` in ``anyflow.json``) so that later runs do not take it as the
    newest export of its stage (``debug=fast`` sets it)."""

    def __init__(self, dirpath: str, every_n_steps: int = 0, debug: bool = False):
        self.dirpath, self.every_n_steps, self.debug = Path(dirpath), int(every_n_steps), bool(debug)
        self.last_step = -1

    def setup(self, trainer, pl_module, stage) -> None:
        if trainer.is_global_zero:  # what a killed writer of this run left behind
            clean_stale(self.dirpath, own=True)

    def _export(self, trainer: L.Trainer, module) -> None:
        if trainer.global_step == self.last_step:
            return
        metadata = {"run_dir": str(self.dirpath.parent), **({"debug": True} if self.debug else {})}
        module.export(self.dirpath, metadata)
        self.last_step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._export(trainer, module)

    def on_train_end(self, trainer, module):
        self._export(trainer, module)
