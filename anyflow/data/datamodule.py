"""The Lightning DataModule: an endless, resumable stream of training batches.

Batch ``i`` on rank ``k`` holds items ``((i·world + k)·B + j)`` of an epoch-wise order of the dataset
(a seeded permutation per epoch, or the natural order for procedural data). It depends only on the
iteration, so a run resumed from a checkpoint at iteration ``i`` sees exactly the batches an
uninterrupted run would, on any number of ranks.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset


class IterationStream(IterableDataset):
    """Yields the items of iterations ``start, start + 1, …`` for one rank, forever."""

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size

    def _order(self, epoch: int) -> torch.Tensor | None:
        if not getattr(self.dataset, "shuffle", True):
            return None
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))

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
                position = iteration * per_iteration + self.rank * self.batch_size + j
                if position // n != epoch:
                    epoch = position // n
                    order = self._order(epoch)
                index = position % n
                yield self.dataset[int(order[index]) if order is not None else index]
            iteration += workers


class AnyFlowDataModule(L.LightningDataModule):
    """Wraps a training dataset (items ``{"video" or "latents", "prompt"}``) into the iteration stream."""

    def __init__(self, train: Dataset, batch_size: int = 16, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be at least 1.")
        self.train_set, self.batch_size, self.num_workers, self.seed = train, batch_size, num_workers, seed

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0  # restored before the loaders are built
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        stream = IterationStream(self.train_set, self.batch_size, seed=self.seed, start=start, rank=rank,
                                 world_size=world)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=False)
