"""BreakHis loader on small fake trees with the real folder and file names."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fedward.data import breakhis, imagecache
from fedward.data.synthetic_multires import DOWNSAMPLING, SUBTYPE_NAMES, degrade
from fedward.errors import ConfigError, DataError

SIZE = 16
# subtype -> (class folder, B/M letter, file code, colour); the colour tells a decoded image's subtype.
SUBTYPES = {
    "adenosis": ("benign", "B", "A", (200, 60, 60)),
    "fibroadenoma": ("benign", "B", "F", (60, 200, 60)),
    "ductal_carcinoma": ("malignant", "M", "DC", (60, 60, 200)),
    "lobular_carcinoma": ("malignant", "M", "LC", (200, 200, 60)),
}
PATIENTS_PER_SUBTYPE = 4
MAGS = ("40X", "100X")
IMAGES_PER_MAG = 2
TOTAL = len(SUBTYPES) * PATIENTS_PER_SUBTYPE * len(MAGS) * IMAGES_PER_MAG  # 64


def make_tree(parent):
    """``parent/BreaKHis_v1/histology_slides/breast/...``: 48 x 16 px PNGs, the left quarter black, the rest the
    subtype's colour plus per-image noise (so every image is distinct and degrading changes it)."""
    breast = parent / "BreaKHis_v1" / "histology_slides" / "breast"
    number = 0
    for subtype, (cls, letter, code, colour) in SUBTYPES.items():
        for p in range(PATIENTS_PER_SUBTYPE):
            slide = f"{10000 + 37 * p + len(code)}{'AB' if p == 1 else ''}"
            patient = breast / cls / "SOB" / subtype / f"SOB_{letter}_{code}_14-{slide}"
            for mag in MAGS:
                folder = patient / mag
                folder.mkdir(parents=True)
                for seq in range(1, IMAGES_PER_MAG + 1):
                    noise = np.random.default_rng(number).integers(-30, 31, size=(16, 48, 3))
                    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                    pixels[:, :12] = 0
                    Image.fromarray(pixels).save(folder / f"SOB_{letter}_{code}-14-{slide}-{mag[:-1]}-{seq:03d}.png")
                    number += 1
    (breast / "malignant" / "SOB" / "ductal_carcinoma" / ".DS_Store").write_text("ignored")
    return breast


@pytest.fixture
def tree(tmp_path):
    make_tree(tmp_path / "data")
    return tmp_path / "data"


def load(data_dir, tmp_path, **kwargs):
    kwargs = {"image_size": SIZE, "progress": False, "cache_dir": tmp_path / "cache", **kwargs}
    return breakhis.load(data_dir=data_dir, **kwargs)


def subtype_of_colour(images: torch.Tensor) -> list[int]:
    """The SUBTYPE_NAMES index of each decoded image, from its mean colour right of the black band."""
    means = images[:, :, :, SIZE // 2 :].float().mean(dim=(2, 3))
    palette = torch.tensor([c for *_, c in SUBTYPES.values()], dtype=torch.float32)
    nearest = torch.cdist(means, palette).argmin(dim=1)
    return [SUBTYPE_NAMES.index(list(SUBTYPES)[i]) for i in nearest.tolist()]


def image_set(images: torch.Tensor) -> list[bytes]:
    return sorted(image.numpy().tobytes() for image in images)


def all_files(data_dir):
    return sorted(data_dir.rglob("*.png"))


def test_module_names():
    assert breakhis.NAME == "breakhis" and breakhis.NUM_CLIENTS == 4 and breakhis.NUM_CLASSES == 2
    assert breakhis.CLIENT_NAMES == ["x1", "x2", "x4", "x8"] and breakhis.CLASS_NAMES == ["benign", "malignant"]


def test_default_patient_disjoint_splits_counts_and_labels(tree, tmp_path):
    data = load(tree, tmp_path)
    info = data.info
    assert data.name == "breakhis" and data.num_clients == 4 and data.class_names == ["benign", "malignant"]
    assert info["layout"] == "breakhis" and info["num_images"] == TOTAL and info["skipped_bad_images"] == 0
    assert info["magnifications"] == ["40X", "100X", "200X", "400X"] and info["group_by"] == "patient" and not info["shared_images"]
    assert len(info["patient_names"]) == len(SUBTYPES) * PATIENTS_PER_SUBTYPE
    assert all(name.startswith("SOB_") for name in info["patient_names"])
    assert sum(len(getattr(c, s)) for c in data.clients for s in ("train", "val", "test")) == TOTAL
    owner = {}
    for k, client in enumerate(data.clients):
        patients = info["patients"][k]
        seen = {s: set(patients[s]) for s in ("train", "val", "test")}
        assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["val"]) and not (seen["val"] & seen["test"])
        assert len(client.train) > 0 and len(client.test) > 0
        for split in ("train", "val", "test"):
            part = getattr(client, split)
            assert part.images.shape[1:] == (3, SIZE, SIZE)
            assert info["counts"][split][k] == part.class_counts(2).tolist()
            subtypes = [info["patient_subtypes"][p] for p in patients[split]]
            assert part.labels.tolist() == [s // 4 for s in subtypes]  # the binary label of the patient's folder
            assert subtype_of_colour(part.images) == subtypes  # the image really is that patient's
            for p in patients[split]:
                assert owner.setdefault(p, k) == k  # no patient at two clients
    assert len(owner) == len(info["patient_names"])


def test_subtype_labels(tree, tmp_path):
    data = load(tree, tmp_path, labels="subtype")
    assert data.num_classes == 8 and data.class_names == SUBTYPE_NAMES
    for k, client in enumerate(data.clients):
        for split in ("train", "val", "test"):
            part = getattr(client, split)
            assert part.labels.tolist() == subtype_of_colour(part.images)
            assert part.labels.tolist() == [data.info["patient_subtypes"][p] for p in data.info["patients"][k][split]]


def test_shared_images_clients_are_degraded_square_x1(tree, tmp_path):
    data = load(tree, tmp_path, shared_images=True)
    x1 = imagecache.decode_images(all_files(tree), SIZE, cache_dir=None, progress=False, preprocess="square").images
    splits = []
    for k, client in enumerate(data.clients):
        images = torch.cat([client.train.images, client.val.images, client.test.images])
        assert len(images) == TOTAL  # every client holds every image
        assert image_set(images) == image_set(degrade(x1, DOWNSAMPLING[k]))
        splits.append(sorted(set(data.info["patients"][k]["test"])))
    client0 = torch.cat([data.clients[0].train.images, data.clients[0].val.images, data.clients[0].test.images])
    client3 = torch.cat([data.clients[3].train.images, data.clients[3].val.images, data.clients[3].test.images])
    assert image_set(client0) == image_set(x1)
    assert not set(image_set(client3)) & set(image_set(x1))  # x8 changes every image
    # Square resize of the 48 x 16 files, aspect ignored: the black left quarter survives (a centre crop drops it).
    assert int(client0[:, :, :, :2].max()) < 40
    assert len({tuple(s) for s in splits}) == 1  # one split for every client
    with pytest.warns(UserWarning, match="reproduction"):
        per_client = load(tree, tmp_path, shared_images=True, split_per_client=True)
    assert len({tuple(sorted(set(per_client.info["patients"][k]["test"]))) for k in range(4)}) > 1


@pytest.mark.parametrize("where", ["parent", "BreaKHis_v1", "histology_slides"])
def test_data_dir_forms(tree, tmp_path, where):
    data_dir = {"parent": tree, "BreaKHis_v1": tree / "BreaKHis_v1",
                "histology_slides": tree / "BreaKHis_v1" / "histology_slides"}[where]  # fmt: skip
    data = load(data_dir, tmp_path)
    reference = load(tree, tmp_path)
    assert data.info["num_images"] == TOTAL
    assert data.info["patients"] == reference.info["patients"]


def test_magnification_filter(tree, tmp_path):
    data = load(tree, tmp_path, magnifications=("40X",))
    assert data.info["num_images"] == TOTAL // 2 and data.info["magnifications"] == ["40X"]
    assert {m for ids in data.info["magnification_ids"] for s in ids.values() for m in s} == {0}
    with pytest.raises(ConfigError, match="50X"):
        load(tree, tmp_path, magnifications=("50X",))


def test_group_by_patient_magnification_warns_and_groups(tree, tmp_path):
    with pytest.warns(UserWarning, match="train and test"):
        data = load(tree, tmp_path, group_by="patient_magnification", shared_images=True)
    for k in range(4):
        groups = {s: set(zip(data.info["patients"][k][s], data.info["magnification_ids"][k][s])) for s in ("train", "val", "test")}
        assert not (groups["train"] & groups["test"]) and not (groups["val"] & groups["test"]) and not (groups["train"] & groups["val"])
    with pytest.warns(UserWarning):
        disjoint = load(tree, tmp_path, group_by="patient_magnification")  # clients are still dealt whole patients
    owners = [set().union(*map(set, disjoint.info["patients"][k].values())) for k in range(4)]
    assert sum(map(len, owners)) == len(set().union(*owners)) == len(disjoint.info["patient_names"])
    with pytest.raises(ConfigError, match="group_by"):
        load(tree, tmp_path, group_by="slide")


def test_same_seed_same_splits(tree, tmp_path):
    first, second = load(tree, tmp_path, seed=3), load(tree, tmp_path, seed=3)
    assert first.info["patients"] == second.info["patients"]
    for a, b in zip(first.clients, second.clients):
        assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert load(tree, tmp_path, seed=4).info["patients"] != first.info["patients"]


def test_missing_tree(tmp_path):
    with pytest.raises(DataError, match="histology_slides/breast") as error:
        load(tmp_path / "nowhere", tmp_path)
    assert str(tmp_path / "nowhere") in str(error.value) and "does not exist" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no histology_slides/breast"):
        load(tmp_path / "empty", tmp_path)


def test_unknown_subtype_folder(tree, tmp_path):
    sob = tree / "BreaKHis_v1" / "histology_slides" / "breast" / "benign" / "SOB"
    (sob / "fibroadenoma").rename(sob / "fibroma")
    with pytest.raises(DataError, match="fibroma.*expected one of adenosis, fibroadenoma, phyllodes_tumor, tubular_adenoma"):
        load(tree, tmp_path)


def test_subtype_folder_in_wrong_class(tree, tmp_path):
    breast = tree / "BreaKHis_v1" / "histology_slides" / "breast"
    shutil.move(breast / "benign" / "SOB" / "adenosis", breast / "malignant" / "SOB" / "adenosis")
    with pytest.raises(DataError, match="adenosis.*ductal_carcinoma"):
        load(tree, tmp_path)


def test_unknown_magnification_folder(tree, tmp_path):
    folder = next((tree / "BreaKHis_v1").rglob("100X"))
    folder.rename(folder.with_name("50X"))
    with pytest.raises(DataError, match="50X.*expected one of 40X, 100X, 200X, 400X"):
        load(tree, tmp_path)


def test_file_name_disagreeing_with_folders(tree, tmp_path):
    path = next((tree / "BreaKHis_v1").rglob("SOB_B_A-*.png"))
    wrong = path.with_name(path.name.replace("SOB_B_A-", "SOB_M_DC-"))
    path.rename(wrong)
    with pytest.raises(DataError, match="expected a name starting SOB_B_A-") as error:
        load(tree, tmp_path)
    assert wrong.name in str(error.value)


def test_empty_tree(tmp_path):
    (tmp_path / "data" / "BreaKHis_v1" / "histology_slides" / "breast" / "benign" / "SOB" / "adenosis").mkdir(parents=True)
    with pytest.raises(DataError, match="no BreakHis image"):
        load(tmp_path / "data", tmp_path)


def test_truncated_png_stops_or_is_skipped(tree, tmp_path):
    path = all_files(tree)[5]
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match="1 image could not be read") as error:
        load(tree, tmp_path)
    assert path.name in str(error.value)
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable image"):
        data = load(tree, tmp_path, skip_bad_images=True)
    assert data.info["skipped_bad_images"] == 1 and data.info["num_images"] == TOTAL - 1
    assert sum(len(getattr(c, s)) for c in data.clients for s in ("train", "val", "test")) == TOTAL - 1


def test_no_warning_by_default(tree, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(tree, tmp_path)
