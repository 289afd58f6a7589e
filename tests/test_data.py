import torch

from anyflow.data import AnyFlowDataModule, IterationStream
from anyflow.data.shapes import all_captions, parse_caption


class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return i


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_stream_is_resumable_and_rank_disjoint():
    data = Numbers()
    full = _take(IterationStream(data, 2, seed=1), 12)
    resumed = _take(IterationStream(data, 2, seed=1, start=3), 6)
    assert resumed == full[6:]
    r0 = _take(IterationStream(data, 2, seed=1, rank=0, world_size=2), 4)
    r1 = _take(IterationStream(data, 2, seed=1, rank=1, world_size=2), 4)
    # the global batch is dealt like cards: rank k holds global positions k, k + W, …
    assert [x for pair in zip(r0, r1) for x in pair] == full[:8]
    assert sorted(full[:10]) == list(range(10))  # one epoch is a permutation


def test_workers_keep_iteration_order():
    data = Numbers()
    dm = AnyFlowDataModule(data, batch_size=2, num_workers=2, seed=1)
    batches = []
    for i, batch in enumerate(dm.train_dataloader()):
        batches.append(batch.tolist())
        if i == 4:
            break
    reference = _take(IterationStream(data, 2, seed=1), 10)
    assert sum(batches, []) == reference


def test_captions_round_trip():
    for text in all_captions():
        shape, colour, direction = parse_caption(text)
        assert text == f"a {colour} {shape} moving {direction}"
