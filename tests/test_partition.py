from __future__ import annotations

import numpy as np
import pytest
import torch

from fedward.data import ClientData, FederatedData, Split
from fedward.data.partition import carve_validation, partition_indices, repartition
from fedward.errors import ConfigError


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def tagged_split(labels: list[int]) -> Split:
    """A split whose image i has every pixel equal to i, so samples can be traced."""
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return Split(images, torch.tensor(labels, dtype=torch.int64))


def tags(split: Split) -> list[int]:
    return split.images[:, 0, 0, 0].tolist()


LABELS_10x100 = np.repeat(np.arange(10), 100)


@pytest.mark.parametrize("method", ["homo", "iid", "hetero", "dirichlet", "pathological", "HETERO"])
def test_every_index_used_exactly_once(method):
    parts = partition_indices(LABELS_10x100, 7, method, alpha=0.3, classes_per_client=3, generator=rng())
    assert len(parts) == 7
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(1000))


def test_homo_sizes_are_equal():
    parts = partition_indices(LABELS_10x100, 3, "homo", generator=rng())
    assert sorted(len(p) for p in parts) == [333, 333, 334]


def _class_shares(parts: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.bincount(LABELS_10x100[p], minlength=10) / len(p) for p in parts])


def test_dirichlet_tiny_alpha_is_skewed_large_alpha_is_near_iid():
    skewed = _class_shares(partition_indices(LABELS_10x100, 5, "dirichlet", alpha=0.01, generator=rng(1)))
    # Each client is dominated by few classes: its largest class share is far above the IID 0.1.
    assert skewed.max(axis=1).mean() > 0.4
    near_iid = _class_shares(partition_indices(LABELS_10x100, 5, "dirichlet", alpha=1000.0, generator=rng(1)))
    assert np.abs(near_iid - 0.1).max() < 0.05


def test_dirichlet_respects_min_size():
    parts = partition_indices(LABELS_10x100, 10, "dirichlet", alpha=0.05, min_size=20, generator=rng(2))
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_that_cannot_succeed_raises_instead_of_looping():
    one_class = np.zeros(20, dtype=np.int64)  # every draw sends nearly everything to one client
    with pytest.raises(ConfigError, match="dirichlet"):
        partition_indices(one_class, 2, "dirichlet", alpha=1e-4, generator=rng())


def test_pathological_gives_each_client_its_classes():
    parts = partition_indices(LABELS_10x100, 5, "pathological", classes_per_client=2, generator=rng(3))
    held = [set(LABELS_10x100[p].tolist()) for p in parts]
    assert all(len(h) == 2 for h in held)
    assert set().union(*held) == set(range(10))
    # 5 clients x 2 classes over 10 classes: every class goes whole to one client.
    assert sorted(len(p) for p in parts) == [200] * 5


def test_partition_errors_name_the_bad_input():
    with pytest.raises(ConfigError, match=r"'shards'.*homo.*dirichlet.*pathological"):
        partition_indices(LABELS_10x100, 3, "shards", generator=rng())
    with pytest.raises(ConfigError, match="alpha"):
        partition_indices(LABELS_10x100, 3, "dirichlet", alpha=0.0, generator=rng())
    with pytest.raises(ConfigError, match="classes_per_client"):
        partition_indices(LABELS_10x100, 3, "pathological", classes_per_client=11, generator=rng())
    with pytest.raises(ConfigError, match="num_clients"):
        partition_indices(LABELS_10x100, 3, "pathological", classes_per_client=2, generator=rng())
    with pytest.raises(ConfigError, match="num_clients"):
        partition_indices(LABELS_10x100, 0, "homo", generator=rng())


def test_carve_validation_counts_by_hand():
    # class 0: 10 -> round(2.0) = 2 to val; class 1: 5 -> 1; class 2: 1 -> 0; class 3: 2 -> round(0.4) = 0
    split = tagged_split([0] * 10 + [1] * 5 + [2] + [3] * 2)
    train, val = carve_validation(split, 0.2, rng())
    assert torch.bincount(val.labels, minlength=4).tolist() == [2, 1, 0, 0]
    assert torch.bincount(train.labels, minlength=4).tolist() == [8, 4, 1, 2]
    assert sorted(tags(train) + tags(val)) == list(range(18))
    # Labels still travel with their images.
    assert all(split.labels[t].item() == l for t, l in zip(tags(val), val.labels.tolist()))


def test_carve_validation_never_takes_a_whole_class():
    # fraction 0.9: class 0 (2 samples) would give round(1.8) = 2, capped at 1; class 1 (1) gives 0.
    train, val = carve_validation(tagged_split([0, 0, 1]), 0.9, rng())
    assert torch.bincount(val.labels, minlength=2).tolist() == [1, 0]
    assert torch.bincount(train.labels, minlength=2).tolist() == [1, 1]


def test_carve_validation_zero_fraction_and_bad_fraction():
    split = tagged_split([0, 1, 1, 2])
    train, val = carve_validation(split, 0.0, rng())
    assert val.images.shape == (0, 3, 2, 2) and len(val.labels) == 0
    assert tags(train) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="fraction"):
        carve_validation(split, 1.0, rng())


def _two_client_data() -> FederatedData:
    pool = tagged_split([c for c in range(4) for _ in range(20)])  # 80 samples, 4 classes x 20
    first, second = pool.subset(torch.arange(0, 50)), pool.subset(torch.arange(50, 80))
    empty = pool.subset(torch.zeros(0, dtype=torch.int64))
    clients = [
        ClientData(0, "a", first.subset(torch.arange(0, 40)), first.subset(torch.arange(40, 45)), first.subset(torch.arange(45, 50))),
        ClientData(1, "b", second, empty, empty),
    ]
    return FederatedData("toy", 4, ["w", "x", "y", "z"], 2, clients, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0), info={"seed": 7})


def test_repartition_pools_and_resplits_every_sample():
    data = _two_client_data()
    new = repartition(data, 4, "homo", seed=1, test_fraction=0.25, val_fraction=0.2)
    assert [c.name for c in new.clients] == ["client_0", "client_1", "client_2", "client_3"]
    assert new.mean == (0.1, 0.2, 0.3) and new.std == (1.0, 2.0, 3.0) and new.class_names == ["w", "x", "y", "z"]
    every = [t for c in new.clients for s in (c.train, c.val, c.test) for t in tags(s)]
    assert sorted(every) == list(range(80))
    assert new.info["seed"] == 7 and new.info["repartition"]["method"] == "homo"
    # Each client's test split is stratified: round(0.25 * n_c) per class, at least one left in train.
    for client in new.clients:
        share = torch.cat([client.train.labels, client.val.labels, client.test.labels])
        expected = [min(int(np.floor(0.25 * n + 0.5)), n - 1) if n else 0 for n in torch.bincount(share, minlength=4).tolist()]
        assert client.test.class_counts(4).tolist() == expected


def test_repartition_is_seeded():
    data = _two_client_data()
    a = repartition(data, 3, "dirichlet", alpha=0.5, seed=4)
    b = repartition(data, 3, "dirichlet", alpha=0.5, seed=4)
    c = repartition(data, 3, "dirichlet", alpha=0.5, seed=5)
    assert [tags(x.train) for x in a.clients] == [tags(x.train) for x in b.clients]
    assert [tags(x.train) for x in a.clients] != [tags(x.train) for x in c.clients]


def test_too_many_clients_for_the_data_are_refused_before_training():
    data = _two_client_data()  # 80 images
    with pytest.raises(ConfigError, match="--client_number 81 is more than the 80 images"):
        repartition(data, 81, "iid", seed=0)
    # 40 clients of 2 images: a client whose two images are of two classes keeps both for training.
    with pytest.raises(ConfigError, match=r"--client_number 40 \(iid\) leaves client \d+ with 2 train and 0 test "
                                          r"images: every client needs both; lower --client_number \(80 images in all\)"):
        repartition(data, 40, "iid", seed=0, test_fraction=0.25)
    assert all(len(c.test) for c in repartition(data, 8, "iid", seed=0, test_fraction=0.25).clients)
