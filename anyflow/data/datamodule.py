"""The Lightning DataModule: an endless, resumable stream of training batches.

Batch ``i`` on rank ``k`` of ``W`` holds the items at global positions ``i·W·B + j·W + k`` (``j < B``) of an
epoch-wise order of the dataset (a seeded permutation per epoch, the dataset's own ``order(seed)`` when it has
one, or the natural order for procedural data): the global batch is dealt out like cards, the same way its times
are (:func:`anyflow.flow.rank_positions`), so sample ``j`` of rank ``k`` is global sample ``j·W + k`` whatever
the number of ranks. It depends only on the iteration, so a run resumed from a checkpoint at iteration ``i`` sees
exactly the batches an uninterrupted run would, on any number of ranks and workers.

Real data has bad items. A dataset whose ``__getitem__`` raises :class:`SkipItem` has that item replaced by the
next ones of the same order (position ``p`` tries ``order[p], order[p+1], …``): the replacement depends only on
the position and the data, so resuming stays exact. Each item then carries ``skipped``: the reasons of the
items passed over to produce it, one per line. The DataModule takes them out of the batch in the main process,
warns once per bad item (whichever worker met it) and keeps the running total (:attr:`AnyFlowDataModule.skipped`,
logged as ``data/skipped``).
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

log = logging.getLogger("anyflow")


class SkipItem(Exception):
    """An unusable item (unreadable, truncated, too short, no caption); the message says which and why."""


class DataError(ValueError):
    """A dataset that cannot train at all; the message is one sentence naming the folder and what is wrong."""


class SkipLog:
    """One warning line per skipped item (the first time this process meets it), at most ``per_minute`` lines a
    minute; every skip is counted by the stream, whether or not a line is printed."""

    def __init__(self, per_minute: int = 20, remember: int = 100_000):
        self.per_minute, self.remember, self.hidden = per_minute, remember, 0
        self._window, self._lines, self._seen = 0.0, 0, set()

    def warn(self, reason: str) -> None:
        if reason in self._seen:
            return
        if len(self._seen) < self.remember:
            self._seen.add(reason)
        now = time.monotonic()
        if now - self._window > 60:
            if self.hidden:
                log.warning("data: %d more skipped items were not shown", self.hidden)
            self._window, self._lines, self.hidden = now, 0, 0
        if self._lines < self.per_minute:
            self._lines += 1
            log.warning("data: skipped %s", reason)
        else:
            self.hidden += 1


SKIPS = SkipLog()


class IterationStream(IterableDataset):
    """Yields the items of iterations ``start, start + 1, …`` for one rank, forever."""

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size

    def _order(self, epoch: int) -> torch.Tensor | None:
        if not getattr(self.dataset, "shuffle", True):
            return None
        if hasattr(self.dataset, "order"):  # e.g. tar shards: shuffled shards, shuffled items within each
            return self.dataset.order(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))

    def _item(self, order, index: int, n: int):
        """The item at ``index`` of ``order``, or the first usable one after it; with ``skipped`` (the reasons,
        one per line) when the dataset can skip."""
        if not getattr(self.dataset, "skips", False):
            return self.dataset[int(order[index]) if order is not None else index]
        reasons = []
        for tried in range(n):
            j = (index + tried) % n
            try:
                item = self.dataset[int(order[j]) if order is not None else j]
            except SkipItem as reason:
                reasons.append(str(reason).replace("\n", " "))
                continue
            return {**item, "skipped": "\n".join(reasons)}
        raise DataError(f"{getattr(self.dataset, 'source', 'the dataset')} has no usable item: all {n} were "
                        "skipped (see the warnings above); fix or replace the data.")

    def __iter__(self):
        n = len(self.dataset)
        per_iteration = self.batch_size * self.world_size
        epoch, order = None, None
        # with DataLoader workers, worker w yields iterations start + w, start + w + W, …; the loader
        # collects batches from the workers round-robin, which restores the iteration order
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        iteration = self.start + worker
        while True:
            for j in range(self.batch_size):
                position = iteration * per_iteration + j * self.world_size + self.rank
                if position // n != epoch:
                    epoch = position // n
                    order = self._order(epoch)
                yield self._item(order, position % n, n)
            iteration += workers


class AnyFlowDataModule(L.LightningDataModule):
    """Wraps a training dataset (items ``{"video" or "latents", "prompt"[, "prompt_embeds"]}``) into the
    iteration stream; counts skipped items (those the dataset rejected at start plus those met in the stream)."""

    def __init__(self, train: Dataset, batch_size: int = 16, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be at least 1.")
        self.train_set, self.batch_size, self.num_workers, self.seed = train, batch_size, num_workers, seed
        self.skipped = int(getattr(train, "skipped_at_start", 0))

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0  # restored before the loaders are built
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        stream = IterationStream(self.train_set, self.batch_size, seed=self.seed, start=start, rank=rank,
                                 world_size=world)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=False)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and "skipped" in batch:
            for reasons in batch.pop("skipped"):
                for reason in reasons.splitlines():
                    SKIPS.warn(reason)
                    self.skipped += 1
        return batch

    def teardown(self, stage: str) -> None:
        if self.skipped and (self.trainer is None or self.trainer.is_global_zero):
            log.info("data: %d items skipped in all on this rank (unreadable, truncated, too short or missing)",
                     self.skipped)


def build_datamodule(data_cfg, seed: int, accumulate: int = 1) -> AnyFlowDataModule:
    """Instantiate ``data.train`` and wrap it; a :class:`DataError` comes out as itself, not as Hydra's
    wrapped instantiation error. With gradient accumulation an iteration takes ``accumulate`` micro-batches of
    ``data.batch_size`` per rank."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        dataset = instantiate(data_cfg.train, _convert_="all")
    except InstantiationException as error:
        if isinstance(error.__cause__, DataError):
            raise error.__cause__ from None
        raise
    return AnyFlowDataModule(dataset, batch_size=data_cfg.batch_size * accumulate, num_workers=data_cfg.num_workers,
                             seed=seed)
