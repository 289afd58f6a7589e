"""Sample videos from the EMA student at several NFE, side by side, every N iterations and at the end."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from anyflow.video import contact_sheet, write_video

log = logging.getLogger("anyflow")


class SampleVideos(L.Callback):
    """Writes ``<dirpath>/step_XXXXXX.{mp4,png}``: rows are prompts, columns are NFE values.

    Every rank samples (sharded networks need all of them); rank 0 writes and logs ``samples/video``.
    """

    def __init__(self, dirpath: str, prompts: list[str], nfe: list[int] = (1, 4), every_n_steps: int = 0,
                 seed: int = 0, fps: int = 8):
        self.dirpath, self.prompts, self.nfe = Path(dirpath), list(prompts), [int(n) for n in nfe]
        self.every_n_steps, self.seed, self.fps = int(every_n_steps), seed, fps
        self.last_step = -1
        self.written: list[Path] = []

    def _sample(self, trainer: L.Trainer, module) -> None:
        if trainer.global_step == self.last_step or not self.prompts:
            return
        if module.text_encoder is None or module.autoencoder is None:  # trained from a latent cache
            if self.last_step == -1 and trainer.global_rank == 0:
                log.info("samples: skipped (training from a latent cache: no VAE or text encoder loaded); "
                         "sample the export with sample.py")
            self.last_step = trainer.global_step
            return
        self.last_step = trainer.global_step
        columns = [module.generate(self.prompts, n, seed=self.seed) for n in self.nfe]  # each [B, 3, F, H, W]
        if trainer.global_rank != 0:
            return
        tiles = torch.cat(columns, dim=-1)  # prompts' clips, NFE side by side along width
        video = torch.cat(list(tiles), dim=-2)  # prompts stacked along height: [3, F, B·H, K·W]
        stem = self.dirpath / f"step_{trainer.global_step:06d}"
        path = write_video(video, stem.with_suffix(".mp4"), fps=self.fps)
        contact_sheet(torch.stack([c for clip in zip(*columns) for c in clip]), stem.with_suffix(".png"))
        self.written.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                caption = f"rows: prompts; columns: nfe={self.nfe}"
                logger.log_video("samples/video", [str(path)], step=trainer.global_step, caption=[caption])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._sample(trainer, module)

    def on_train_end(self, trainer, module):
        self._sample(trainer, module)
