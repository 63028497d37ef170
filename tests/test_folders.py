"""Per-hospital image folders on tiny fake trees: <root>/<client>/<split>/<class>/<image>."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from fedward.data import folders
from fedward.errors import ConfigError, DataError

# Each class has its own colour, so a decoded image tells which label it must carry.
COLOURS = {"benign": (200, 0, 0), "malignant": (0, 200, 0), "other": (0, 0, 200)}
CLASSES = sorted(COLOURS)  # benign, malignant, other
# client -> split -> {class: count}; "beta" has no "other" class and no val folder.
TREE = {
    "alpha": {"train": {"benign": 3, "malignant": 2, "other": 1}, "val": {"benign": 1, "malignant": 1}, "test": {"benign": 1, "other": 1}},
    "beta": {"train": {"benign": 4, "malignant": 2}, "test": {"malignant": 1, "benign": 1}},
}
EXTS = (".png", ".jpg", ".bmp", ".PNG", ".tiff")


def write_image(path, colour, size=(10, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_tree(root, tree=TREE):
    for client, splits in tree.items():
        for split, counts in splits.items():
            for cls, n in counts.items():
                for i in range(n):
                    write_image(root / client / split / cls / f"img{i}{EXTS[i % len(EXTS)]}", COLOURS[cls])
    return root


def load(root, tmp_path, **kwargs):
    kwargs = {"data_dir": root, "image_size": 8, "cache_dir": tmp_path / "cache", "progress": False, "val_fraction": 0.34, **kwargs}
    return folders.load(**kwargs)


def test_clients_classes_counts_and_colours(tmp_path):
    root = make_tree(tmp_path / "data")
    data = load(root, tmp_path)
    assert [c.name for c in data.clients] == ["alpha", "beta"]
    assert data.class_names == CLASSES and data.num_classes == 3 and data.info["classes"] == CLASSES
    # alpha has a val folder: train and val as on disk
    assert data.clients[0].train.class_counts(3).tolist() == [3, 2, 1]
    assert data.clients[0].val.class_counts(3).tolist() == [1, 1, 0]
    assert data.clients[0].test.class_counts(3).tolist() == [1, 0, 1]
    # beta has none: val carved from train, min(round(0.34 n), n - 1) per class: 4 -> 1, 2 -> 1
    assert data.clients[1].train.class_counts(3).tolist() == [3, 1, 0]
    assert data.clients[1].val.class_counts(3).tolist() == [1, 1, 0]
    assert data.clients[1].test.class_counts(3).tolist() == [1, 1, 0]
    assert data.info["val_source"] == {"alpha": "folder", "beta": "carved from train (0.34)"}
    assert data.info["counts"]["train"] == [[3, 2, 1], [3, 1, 0]]
    for split in ("train", "val", "test"):
        pooled = data.pooled(split)
        assert pooled.images.shape[1:] == (3, 8, 8) and pooled.images.dtype == torch.uint8
        colours = torch.tensor([COLOURS[c] for c in CLASSES])[pooled.labels]
        # JPEG is lossy: within a few levels of the class colour
        assert (pooled.images[:, :, 4, 4].int() - colours).abs().max() <= 8


def test_cache_reused_and_deterministic(tmp_path):
    root = make_tree(tmp_path / "data")
    first = load(root, tmp_path)
    second = load(root, tmp_path)
    assert first.info["cache_file"] == second.info["cache_file"] is not None
    assert str(tmp_path / "cache") in first.info["cache_file"]
    for a, b in zip(first.clients, second.clients):
        assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.train.images, b.train.images)


def test_default_cache_dir_under_fedward_cache(tmp_path, monkeypatch):
    from fedward.data.imagecache import decoded_cache_dir
    from fedward.flower.node import default_state_dir
    from fedward.priors import default_prior_dir

    monkeypatch.setenv("FEDWARD_CACHE", str(tmp_path / "fc"))
    assert decoded_cache_dir() == tmp_path / "fc" / "decoded"
    assert default_prior_dir() == tmp_path / "fc" / "priors" and default_state_dir() == tmp_path / "fc" / "flower-nodes"


def test_misplaced_image_warns(tmp_path):
    root = make_tree(tmp_path / "data")
    write_image(root / "beta" / "train" / "stray.png", (1, 2, 3))
    with pytest.warns(RuntimeWarning, match=r"outside a class folder.*beta/train/stray\.png"):
        data = load(root, tmp_path)
    assert len(data.pooled("train")) + len(data.pooled("val")) == 14
    assert data.info["misplaced_images"] == [str(root / "beta" / "train" / "stray.png")]


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"root .*nowhere does not exist"):
        load(tmp_path / "nowhere", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no client folders"):
        load(tmp_path / "empty", tmp_path)


def test_client_without_train(tmp_path):
    root = make_tree(tmp_path / "data")
    (root / "gamma" / "test" / "benign").mkdir(parents=True)
    with pytest.raises(DataError, match=r"gamma has no train folder"):
        load(root, tmp_path)


def test_empty_client(tmp_path):
    root = make_tree(tmp_path / "data")
    (root / "gamma" / "train" / "benign").mkdir(parents=True)
    (root / "gamma" / "test").mkdir(parents=True)
    with pytest.raises(DataError, match=r"client 'gamma' has no training images"):
        load(root, tmp_path)


def test_bad_image_named_or_skipped(tmp_path):
    root = make_tree(tmp_path / "data")
    bad = root / "alpha" / "train" / "benign" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png"):
        load(root, tmp_path)
    with pytest.warns(RuntimeWarning, match=r"skipped 1 unreadable image"):
        data = load(root, tmp_path, skip_bad_images=True)
    assert data.clients[0].train.class_counts(3).tolist() == [3, 2, 1]
    assert data.info["skipped_bad_images"] == 1 and "broken.png" in data.info["bad_images"][0]


def test_dicom_is_an_image_and_a_corrupt_one_is_named(tmp_path):
    # .dcm files are images now (read with pydicom; tests/test_dicom.py): a corrupt one is an
    # unreadable image like any other, named in the error.
    root = make_tree(tmp_path / "data")
    dcm = root / "beta" / "test" / "benign" / "scan.dcm"
    dcm.write_bytes(b"\0" * 132)
    with pytest.raises(DataError, match=r"scan\.dcm"):
        load(root, tmp_path)


def test_bad_arguments(tmp_path):
    root = make_tree(tmp_path / "data")
    with pytest.raises(ConfigError):
        load(root, tmp_path, image_size=4)
    with pytest.raises(ConfigError):
        load(root, tmp_path, val_fraction=1.0)


def test_no_warning_on_clean_tree(tmp_path):
    root = make_tree(tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load(root, tmp_path)
    assert data.class_counts("test").tolist() == [[1, 0, 1], [1, 1, 0]]


def test_links_that_leave_their_split_or_join_two_splits_are_refused(tmp_path):
    root = make_tree(tmp_path / "data")
    (root / "alpha" / "train" / "other").rename(tmp_path / "elsewhere")
    (root / "alpha" / "train" / "other").symlink_to("../../..", target_is_directory=True)  # crawls other trees
    with pytest.raises(DataError, match="is a link to .*, outside its split folder .*alpha/train"):
        load(root, tmp_path)
    (root / "alpha" / "train" / "other").unlink()
    (root / "alpha" / "train" / "other").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(DataError, match="outside its split folder"):
        load(root, tmp_path)
    (root / "alpha" / "train" / "other").unlink()
    (tmp_path / "elsewhere").rename(root / "alpha" / "train" / "other")
    # A client's whole train folder linked to its test folder: it would train on its test images.
    import shutil

    shutil.rmtree(root / "beta" / "train")
    (root / "beta" / "train").symlink_to("test", target_is_directory=True)
    with pytest.raises(DataError, match="beta/train and .*beta/test are the same images once links are resolved"):
        load(root, tmp_path)
    # A client folder that is a link to a disk elsewhere is fine.
    (root / "beta" / "train").unlink()
    make_tree(tmp_path / "disk", {"beta": TREE["beta"]})
    shutil.rmtree(root / "beta")
    (root / "beta").symlink_to(tmp_path / "disk" / "beta", target_is_directory=True)
    assert load(root, tmp_path).clients[1].train.class_counts(3).tolist() == [3, 1, 0]
