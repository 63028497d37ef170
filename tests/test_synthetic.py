from __future__ import annotations

import warnings

import pytest
import torch

from fedward.data import DATASETS, FederatedData, get_dataset_module, load_federated, synthetic
from fedward.errors import ConfigError

# Fed-ISIC2019 counts x 0.05, rounded half up, at least 1 where the real count is > 0; worked out
# by hand from the tables in the reference notes (e.g. BCN SCC 330 * 0.05 = 16.5 -> 17,
# HAM_vidir_molemax BCC 2 * 0.05 = 0.1 -> kept at 1).
TRAIN_AT_005 = [
    [114, 168, 112, 30, 46, 5, 4, 17],
    [1, 149, 1, 0, 5, 1, 2, 0],
    [27, 74, 9, 1, 19, 2, 3, 1],
    [14, 32, 11, 4, 20, 1, 1, 7],
    [8, 17, 0, 0, 7, 0, 0, 0],
    [3, 14, 1, 0, 1, 1, 1, 0],
]
TEST_AT_005 = [
    [29, 42, 28, 7, 11, 1, 1, 5],
    [1, 37, 0, 0, 1, 1, 1, 0],
    [7, 18, 2, 1, 5, 1, 1, 0],
    [3, 8, 4, 1, 4, 1, 0, 2],
    [2, 3, 0, 0, 2, 0, 0, 0],
    [1, 4, 0, 0, 1, 0, 1, 0],
]
SMALL = {"scale": 0.05, "image_size": 8}


def _same(a: FederatedData, b: FederatedData) -> bool:
    return all(
        torch.equal(getattr(x, s).images, getattr(y, s).images) and torch.equal(getattr(x, s).labels, getattr(y, s).labels)
        for x, y in zip(a.clients, b.clients)
        for s in ("train", "val", "test")
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> FederatedData:
    return synthetic.load(seed=3, val_fraction=0.0, cache_dir=tmp_path_factory.mktemp("cache"), **SMALL)


def test_class_counts_are_the_scaled_fed_isic_tables(small):
    assert small.class_counts("train").tolist() == TRAIN_AT_005
    assert small.class_counts("test").tolist() == TEST_AT_005
    msk = small.clients[synthetic.CLIENT_NAMES.index("MSK")]
    present = {synthetic.CLASS_NAMES[c] for c in msk.train.labels.unique().tolist()}
    assert present == {"MEL", "NV", "BKL"}
    assert {synthetic.CLASS_NAMES[c] for c in msk.test.labels.unique().tolist()} == {"MEL", "NV", "BKL"}


def test_val_is_carved_from_train_stratified(tmp_path):
    data = synthetic.load(seed=3, val_fraction=0.1, cache_dir=tmp_path, **SMALL)
    assert (data.class_counts("train") + data.class_counts("val")).tolist() == TRAIN_AT_005
    # BCN MEL: 114 train samples -> round(11.4) = 11 in val; a class of 1 keeps its sample in train.
    assert data.class_counts("val")[0, 0].item() == 11
    assert data.class_counts("val")[1, 0].item() == 0 and data.class_counts("train")[1, 0].item() == 1


def test_shapes_dtypes_and_metadata(small):
    assert small.num_clients == 6 and small.num_classes == 8 and small.image_size == 8
    assert [c.name for c in small.clients] == synthetic.CLIENT_NAMES
    for client in small.clients:
        for split in (client.train, client.val, client.test):
            assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
            assert split.images.shape[1:] == (3, 8, 8)
    assert small.clients[0].val.images.shape == (0, 3, 8, 8)
    assert small.mean == (0.485, 0.456, 0.406) and small.std == (0.229, 0.224, 0.225)
    assert small.info["source"] == "synthetic" and small.info["seed"] == 3 and small.info["scale"] == 0.05
    assert small.info["difficulty"]["num_modes"] == synthetic.DEFAULT_DIFFICULTY["num_modes"]


def test_images_are_not_blank_and_hospitals_differ(small):
    bcn, molemax = small.clients[0].train.images.float(), small.clients[1].train.images.float()
    assert bcn.std() > 10  # a lesion on skin, not a flat image
    # Same class (NV), different hospitals: the acquisition shifts move the mean colour.
    nv = synthetic.CLASS_NAMES.index("NV")
    mean_bcn = bcn[small.clients[0].train.labels == nv].mean(dim=(0, 2, 3))
    mean_molemax = molemax[small.clients[1].train.labels == nv].mean(dim=(0, 2, 3))
    assert (mean_bcn - mean_molemax).abs().max() > 5


def test_same_seed_is_bit_identical_other_seed_differs(tmp_path, small):
    again = synthetic.load(seed=3, val_fraction=0.0, cache_dir=tmp_path / "fresh", **SMALL)
    assert _same(small, again)
    other = synthetic.load(seed=4, val_fraction=0.0, cache_dir=tmp_path / "fresh", **SMALL)
    assert other.class_counts("train").tolist() == TRAIN_AT_005
    assert not torch.equal(other.clients[0].train.images, small.clients[0].train.images)


def test_difficulty_knob_changes_the_pixels_and_the_cache_key(tmp_path):
    easy = synthetic.load(seed=0, val_fraction=0.0, cache_dir=tmp_path, hospital_shift=0.0, **SMALL)
    hard = synthetic.load(seed=0, val_fraction=0.0, cache_dir=tmp_path, **SMALL)
    assert not torch.equal(easy.clients[1].train.images, hard.clients[1].train.images)
    assert len(list(tmp_path.glob("synthetic-*.pt"))) == 2
    assert easy.info["difficulty"]["hospital_shift"] == 0.0


def test_cache_round_trip_reads_the_file(tmp_path, monkeypatch):
    first = synthetic.load(seed=1, cache_dir=tmp_path, **SMALL)
    files = list(tmp_path.glob("synthetic-*.pt"))
    assert len(files) == 1
    assert first.info["cache_file"] == str(files[0])

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated although a valid cache exists")

    monkeypatch.setattr(synthetic, "_generate_all", no_generation)
    assert _same(first, synthetic.load(seed=1, cache_dir=tmp_path, **SMALL))


def test_corrupt_cache_is_regenerated_with_a_warning(tmp_path):
    first = synthetic.load(seed=1, cache_dir=tmp_path, **SMALL)
    (path,) = tmp_path.glob("synthetic-*.pt")
    path.write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match="regenerating"):
        second = synthetic.load(seed=1, cache_dir=tmp_path, **SMALL)
    assert _same(first, second)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten cache loads cleanly
        assert _same(first, synthetic.load(seed=1, cache_dir=tmp_path, **SMALL))


def test_default_cache_dir_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDWARD_CACHE", str(tmp_path / "env-cache"))
    synthetic.load(seed=2, scale=0.01, image_size=8)
    assert len(list((tmp_path / "env-cache").glob("synthetic-*.pt"))) == 1


def test_bad_options_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="noise_levle"):
        synthetic.load(cache_dir=tmp_path, noise_levle=2.0)
    with pytest.raises(ConfigError, match="class_overlap"):
        synthetic.load(cache_dir=tmp_path, class_overlap=1.5)
    with pytest.raises(ConfigError, match="scale"):
        synthetic.load(cache_dir=tmp_path, scale=0)
    with pytest.raises(ConfigError, match="image_size"):
        synthetic.load(cache_dir=tmp_path, image_size=4)


def test_registry(tmp_path):
    assert DATASETS["synthetic"].from_config is synthetic.from_config and DATASETS["synthetic"].Options is synthetic.Options
    assert get_dataset_module("synthetic") is synthetic
    with pytest.raises(ConfigError, match="'isic'.*synthetic"):
        get_dataset_module("isic")
    data = load_federated("synthetic", seed=5, scale=0.01, image_size=8, cache_dir=tmp_path)
    assert data.name == "synthetic" and data.info["seed"] == 5 and data.image_size == 8
