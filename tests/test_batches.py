"""The training batches every method draws (``training_batches``) and FedAvg's example counts."""

from __future__ import annotations

import torch

from fedward.algorithms.base import examples_seen, training_batches
from fedward.data import Split


def _split(n: int) -> Split:
    return Split(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64))


def test_the_last_incomplete_batch_is_dropped_and_each_epoch_reshuffles():
    batches = list(training_batches(_split(10), 4, 2, torch.Generator().manual_seed(0)))
    assert [(epoch, len(index)) for epoch, index in batches] == [(0, 4), (0, 4), (1, 4), (1, 4)]
    first, second = torch.cat([i for e, i in batches if e == 0]), torch.cat([i for e, i in batches if e == 1])
    assert len(set(first.tolist())) == 8 and not torch.equal(first, second)
    again = list(training_batches(_split(10), 4, 2, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))


def test_a_client_smaller_than_a_batch_trains_on_one_batch_of_all_its_samples():
    (batch,) = training_batches(_split(3), 8, 1, torch.Generator().manual_seed(0))
    assert sorted(batch[1].tolist()) == [0, 1, 2]
    assert (examples_seen(3, 8), examples_seen(10, 4), examples_seen(8, 4)) == (3, 8, 8)  # floor(n / B) * B


def test_instance_sampling_draws_every_class_equally_often_with_replacement():
    # 9 samples of class 0, 1 of class 1: weights 1/9 and 1, so each class is half of the draws
    labels = torch.tensor([0] * 9 + [1])
    split = Split(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), labels)
    batches = list(training_batches(split, 5, 400, torch.Generator().manual_seed(0), balanced=True))
    assert {len(index) for _, index in batches} == {5} and len(batches) == 800  # floor(10 / 5) batches per epoch
    drawn = torch.cat([index for _, index in batches])
    share = float((labels[drawn] == 1).double().mean())
    assert abs(share - 0.5) < 0.02  # 4000 draws: the standard error is 0.008
    assert len(set(torch.cat([i for e, i in batches if e == 0]).tolist())) < 10  # with replacement
    again = list(training_batches(split, 5, 400, torch.Generator().manual_seed(0), balanced=True))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
