"""MedMNIST loader on tiny fake .npz files with the official keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedward.data import medmnist
from fedward.errors import ConfigError, DataError

NUM_CLASSES = 3
COUNTS = {"train": 60, "val": 21, "test": 20}


def fake_split(n: int, rgb: bool, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images whose pixel value encodes (label, index): pixel = 10 * label + index % 10."""
    labels = (np.arange(n) % NUM_CLASSES).astype(np.int64)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(labels)
    values = (10 * labels + np.arange(n) % 10).astype(np.uint8)
    shape = (n, size, size, 3) if rgb else (n, size, size)
    images = np.broadcast_to(values.reshape((n,) + (1,) * (len(shape) - 1)), shape).astype(np.uint8)
    return images, labels.reshape(n, 1)


def write_npz(path, rgb=False, size=8, drop=(), **override):
    arrays = {}
    for i, (split, n) in enumerate(COUNTS.items()):
        images, labels = fake_split(n, rgb, size, i)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    arrays.update(override)
    for key in drop:
        del arrays[key]
    np.savez(path, **arrays)
    return arrays


def load(tmp_path, **kwargs):
    kwargs = {"data_dir": tmp_path, "flag": "fakemnist", "image_size": 8, "num_clients": 3, "seed": 1, **kwargs}
    return medmnist.load(**kwargs)


def test_dirichlet_split_covers_train_once_and_is_deterministic(tmp_path):
    arrays = write_npz(tmp_path / "fakemnist.npz")
    data = load(tmp_path, partition="dirichlet", alpha=0.3)
    again = load(tmp_path, partition="dirichlet", alpha=0.3)
    other = load(tmp_path, partition="dirichlet", alpha=0.3, seed=2)
    assert data.num_clients == 3 and data.num_classes == NUM_CLASSES and data.image_size == 8
    train = data.pooled("train")
    # every training image exactly once: the pixel codes of the pooled train set are a permutation
    codes = sorted(train.images[:, 0, 0, 0].tolist())
    assert codes == sorted(arrays["train_images"][:, 0, 0].tolist())
    assert len(train) == COUNTS["train"]
    # labels travel with their images
    assert torch.equal(train.images[:, 0, 0, 0] // 10, train.labels)
    assert torch.equal(data.class_counts("train"), again.class_counts("train"))
    for a, b in zip(data.clients, again.clients):
        assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(data.class_counts("train"), other.class_counts("train"))
    assert data.class_counts("train").sum(0).tolist() == [20, 20, 20]
    assert data.info["counts"]["train"] == data.class_counts("train").tolist()


def test_val_follows_train_distribution_and_test_is_iid(tmp_path):
    write_npz(tmp_path / "fakemnist.npz")
    data = load(tmp_path, partition="pathological", classes_per_client=1)
    train, val, test = (data.class_counts(s) for s in ("train", "val", "test"))
    # 3 clients, 1 class each: client k's val holds exactly the val images of its train class
    assert (train > 0).sum(1).tolist() == [1, 1, 1]
    assert torch.equal(val > 0, train > 0)
    assert val.sum(0).tolist() == [7, 7, 7] and val.sum().item() == COUNTS["val"]
    # test: the whole official test set, split iid into near-equal disjoint shares
    assert test.sum().item() == COUNTS["test"]
    assert sorted(len(c.test) for c in data.clients) == [6, 7, 7]
    assert data.clients[0].name == "client 0"


def test_val_fraction_carves_from_train(tmp_path):
    write_npz(tmp_path / "fakemnist.npz")
    data = load(tmp_path, partition="iid", num_clients=2, val_fraction=0.2)
    # iid: 30 train images per client; carving takes round(0.2 * n_c) of every class
    for client in data.clients:
        assert len(client.train) + len(client.val) == 30
        share = client.train.class_counts(3) + client.val.class_counts(3)
        expected = torch.floor(share.float() * 0.2 + 0.5).long()
        assert torch.equal(client.val.class_counts(3), expected)
    assert data.pooled("train").labels.numel() + data.pooled("val").labels.numel() == COUNTS["train"]


def test_grey_to_rgb_and_resize(tmp_path):
    arrays = write_npz(tmp_path / "fakemnist.npz", rgb=False, size=8)
    data = load(tmp_path, image_size=16, partition="iid")
    images = data.pooled("test").images
    assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    # a constant image stays constant through the bilinear resize
    assert (images == images[:, :, :1, :1]).all()
    assert sorted(images[:, 0, 0, 0].tolist()) == sorted(arrays["test_images"][:, 0, 0].tolist())


def test_rgb_sized_file(tmp_path):
    arrays = write_npz(tmp_path / "fakemnist_64.npz", rgb=True, size=10)
    arrays["train_images"][:, :, :, 1] = 0
    np.savez(tmp_path / "fakemnist_64.npz", **arrays)
    data = load(tmp_path, size=64, image_size=8, partition="iid")
    train = data.pooled("train")
    assert train.images.shape[1:] == (3, 8, 8)
    assert (train.images[:, 1] == 0).all() and (train.images[:, 0] > 0).any()


def test_known_flag_class_count(tmp_path):
    write_npz(tmp_path / "dermamnist.npz")
    data = medmnist.load(data_dir=tmp_path, num_clients=2, partition="iid", image_size=8)
    assert data.num_classes == 7 and len(data.class_names) == 7
    assert data.class_counts("train").shape == (2, 7)
    assert medmnist.KNOWN_FLAGS["pathmnist"] == 9 and medmnist.NUM_CLASSES is None


def test_missing_file_lists_npz_files(tmp_path):
    write_npz(tmp_path / "pathmnist.npz")
    with pytest.raises(DataError, match=r"fakemnist\.npz not found.*pathmnist\.npz"):
        load(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="size"):
        load(tmp_path, size=32)


def test_missing_key(tmp_path):
    write_npz(tmp_path / "fakemnist.npz", drop=("val_labels",))
    with pytest.raises(DataError, match=r"fakemnist\.npz has no key 'val_labels'"):
        load(tmp_path)


def test_multilabel_rejected(tmp_path):
    write_npz(tmp_path / "chestmnist.npz", train_labels=np.zeros((60, 14), dtype=np.int64))
    with pytest.raises(DataError, match=r"chestmnist\.npz.*'train_labels'.*'chestmnist' is a multi-label"):
        load(tmp_path, flag="chestmnist")


def test_label_out_of_range(tmp_path):
    labels = np.zeros((20, 1), dtype=np.int64)
    labels[5] = 7
    write_npz(tmp_path / "fakemnist.npz", test_labels=labels)
    with pytest.raises(DataError, match=r"fakemnist\.npz, key 'test_labels': label 7 at index 5 out of range; expected 0\.\.2"):
        load(tmp_path, num_classes=3)


def test_count_mismatch(tmp_path):
    write_npz(tmp_path / "fakemnist.npz", val_labels=np.zeros((5, 1), dtype=np.int64))
    with pytest.raises(DataError, match=r"fakemnist\.npz: 21 images in 'val_images' but 5 labels in 'val_labels'"):
        load(tmp_path)


def test_bad_image_dtype_and_pickle_refused(tmp_path):
    write_npz(tmp_path / "fakemnist.npz", train_images=np.zeros((60, 8, 8), dtype=np.float32))
    with pytest.raises(DataError, match=r"'train_images': images must be uint8"):
        load(tmp_path)
    write_npz(tmp_path / "fakemnist.npz", train_images=np.array([object()] * 60, dtype=object))
    with pytest.raises(DataError, match=r"fakemnist\.npz"):
        load(tmp_path)
