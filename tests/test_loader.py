from __future__ import annotations

import pytest
import torch

from fedward.data import Split
from fedward.data.loader import batch_indices, iterate_split
from fedward.errors import ConfigError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_batch_counts_with_and_without_drop_last():
    assert [len(b) for b in batch_indices(10, 4, gen(), drop_last=True)] == [4, 4]
    assert [len(b) for b in batch_indices(10, 4, gen(), drop_last=False)] == [4, 4, 2]
    assert [len(b) for b in batch_indices(8, 4, gen())] == [4, 4]
    assert batch_indices(3, 4, gen(), drop_last=True) == []  # as a DataLoader with drop_last


def test_shuffled_batches_use_every_index_once():
    batches = batch_indices(23, 5, gen(1), shuffle=True, drop_last=False)
    joined = torch.cat(batches)
    assert sorted(joined.tolist()) == list(range(23))
    assert joined.tolist() != list(range(23))
    assert torch.equal(joined, torch.cat(batch_indices(23, 5, gen(1), drop_last=False)))


def test_unshuffled_batches_keep_order():
    assert [b.tolist() for b in batch_indices(5, 2, None, shuffle=False, drop_last=False)] == [[0, 1], [2, 3], [4]]


def test_bad_arguments():
    with pytest.raises(ConfigError, match="batch_size"):
        batch_indices(5, 0, gen())
    with pytest.raises(ValueError, match="Generator"):
        batch_indices(5, 2, None, shuffle=True)


def test_iterate_split_yields_matching_images_and_labels():
    n = 7
    images = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    split = Split(images, torch.arange(n, dtype=torch.int64) * 10)
    batches = list(iterate_split(split, 3))
    assert [len(y) for _, y in batches] == [3, 3, 1]
    for x, y in iterate_split(split, 2, gen(), shuffle=True, drop_last=True):
        assert x.dtype == torch.uint8 and torch.equal(x[:, 0, 0, 0].long() * 10, y)
