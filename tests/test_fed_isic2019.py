"""Fed-ISIC2019 loader on small fake trees with the real file names, CSV columns and folders."""

from __future__ import annotations

import csv
import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fedward.data import fed_isic2019, imagecache
from fedward.errors import DataError

CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
FLAMBY_HEADER = ["image", *CLASSES, "UNK", "target", "center", "fold", "fold2"]
# Each class has its own colour, so a decoded image tells which label it must carry.
PALETTE = np.array([(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (200, 0, 200), (0, 200, 200), (255, 255, 255), (0, 0, 0)])
SIZES = [(8, 8), (40, 30), (30, 40), (12, 9), (16, 16), (9, 20), (24, 12)]
# Per-client class counts the fake CSVs are written from (rows MEL..SCC per client 0..5).
TRAIN = [
    [2, 3, 2, 1, 1, 1, 1, 1],
    [1, 3, 0, 0, 1, 0, 1, 0],
    [2, 2, 1, 0, 1, 0, 0, 0],
    [1, 2, 1, 1, 1, 0, 0, 1],
    [1, 2, 0, 0, 1, 0, 0, 0],
    [1, 2, 0, 0, 1, 0, 0, 0],
]
TEST = [
    [1, 1, 1, 0, 1, 0, 0, 1],
    [0, 1, 0, 0, 1, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0],
    [0, 1, 1, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0],
]
# With val_fraction 0.34 a class with n train images gives min(round(0.34 n), n - 1) to val:
# n = 1 -> 0, n = 2 -> 1, n = 3 -> 1.
VAL_AT_034 = [[{0: 0, 1: 0, 2: 1, 3: 1}[n] for n in row] for row in TRAIN]


def records():
    """(image id, client, split, label) in a fixed shuffled order (so the loader must group rows)."""
    out = []
    number = 0
    for client in range(6):
        for split, table in (("train", TRAIN), ("test", TEST)):
            for label, count in enumerate(table[client]):
                for _ in range(count):
                    name = f"ISIC_{number:07d}" + ("_downsampled" if client == 4 else "")  # MSK's ids carry this suffix
                    out.append((name, client, split, label))
                    number += 1
    order = np.random.default_rng(1).permutation(len(out))
    return [out[i] for i in order]


def write_images(folder, recs):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, _, _, label) in enumerate(recs):
        Image.new("RGB", SIZES[i % len(SIZES)], tuple(int(c) for c in PALETTE[label])).save(folder / f"{name}.jpg", quality=90)


def make_flamby(root, split_file=None):
    """``root/ISIC_2019_Training_Input_preprocessed/*.jpg`` + FLamby's ``train_test_split``."""
    recs = records()
    write_images(root / "ISIC_2019_Training_Input_preprocessed", recs)
    with open(split_file or root / "train_test_split", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FLAMBY_HEADER)
        for name, client, split, label in recs:
            onehot = ["1.0" if c == label else "0.0" for c in range(8)]
            writer.writerow([name, *onehot, "0.0", label, client, split, f"{split}_{client}"])
    return root


def make_fedmas(root, fold=1):
    """``root/Flamby_isic/{train,val}_flamby_isic_fl_<k>_<fold>.csv`` + ``root/ISIC_2019_Training_Input``."""
    recs = records()
    write_images(root / "ISIC_2019_Training_Input", recs)
    data_dir = root / "Flamby_isic"
    data_dir.mkdir(parents=True)
    for client in range(6):
        for split, prefix in (("train", "train"), ("test", "val")):
            with open(data_dir / f"{prefix}_flamby_isic_fl_{client}_{fold}.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["", "image_name", "dx"])
                mine = [(n, lab) for n, c, s, lab in recs if c == client and s == split]
                for index, (name, label) in enumerate(mine):
                    writer.writerow([index, name, label])
    return data_dir


def edit_csv(path, change):
    """Rewrite ``path`` with ``change(header, rows)`` applied (rows are lists of strings)."""
    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    header, rows = change(header, rows)
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])


def load(data_dir, tmp_path, **kwargs):
    kwargs = {"image_size": 8, "val_fraction": 0.34, "cache_dir": tmp_path / "cache", "progress": False, **kwargs}
    return fed_isic2019.load(data_dir=data_dir, **kwargs)


def check_data(data):
    assert data.name == "fed_isic2019" and data.num_clients == 6 and data.num_classes == 8
    assert [c.name for c in data.clients] == fed_isic2019.CLIENT_NAMES
    assert data.class_counts("test").tolist() == TEST
    assert data.class_counts("val").tolist() == VAL_AT_034
    assert (data.class_counts("train") + data.class_counts("val")).tolist() == TRAIN
    for client in data.clients:
        for split in ("train", "val", "test"):
            part = getattr(client, split)
            assert part.images.dtype == torch.uint8 and tuple(part.images.shape[1:]) == (3, 8, 8)
            if len(part):  # each image's colour is its class's colour: images and labels line up
                means = part.images.float().mean(dim=(2, 3))
                nearest = torch.cdist(means, torch.tensor(PALETTE, dtype=torch.float32)).argmin(dim=1)
                assert torch.equal(nearest, part.labels)


def same(a, b):
    return all(torch.equal(getattr(x, s).images, getattr(y, s).images) and torch.equal(getattr(x, s).labels, getattr(y, s).labels)
               for x, y in zip(a.clients, b.clients) for s in ("train", "val", "test"))  # fmt: skip


def test_module_names():
    assert fed_isic2019.NAME == "fed_isic2019" and fed_isic2019.NUM_CLIENTS == 6 and fed_isic2019.NUM_CLASSES == 8
    assert fed_isic2019.CLASS_NAMES == CLASSES
    assert fed_isic2019.CLIENT_NAMES == ["BCN", "HAM_vidir_molemax", "HAM_vidir_modern", "HAM_rosendahl", "MSK", "HAM_vienna_dias"]


@pytest.mark.parametrize("layout", ["flamby", "auto"])
def test_flamby_layout(tmp_path, layout):
    root = make_flamby(tmp_path / "isic")
    data = load(root, tmp_path, layout=layout)
    check_data(data)
    assert data.info["layout"] == "flamby" and data.info["split_files"] == [str(root / "train_test_split")]
    assert data.info["counts"]["test"] == TEST and data.info["skipped_bad_images"] == 0
    assert data.info["num_images"] == sum(map(sum, TRAIN)) + sum(map(sum, TEST))


def test_flamby_split_csv_argument(tmp_path):
    root = tmp_path / "isic"
    root.mkdir()
    make_flamby(root, split_file=tmp_path / "my_split.csv")
    check_data(load(root, tmp_path, split_csv=tmp_path / "my_split.csv"))
    with pytest.raises(DataError, match=f"FLamby split file {root / 'train_test_split'} not found"):
        load(root, tmp_path, layout="flamby")


@pytest.mark.parametrize("layout", ["fedmas", "auto"])
def test_fedmas_layout(tmp_path, layout):
    data_dir = make_fedmas(tmp_path / "data")
    data = load(data_dir, tmp_path, layout=layout)
    check_data(data)
    assert data.info["layout"] == "fedmas" and len(data.info["split_files"]) == 12
    assert data.info["fold"] == 1


def test_both_layouts_give_the_same_data(tmp_path):
    flamby = load(make_flamby(tmp_path / "isic"), tmp_path)
    fedmas = load(make_fedmas(tmp_path / "data"), tmp_path)
    assert same(flamby, fedmas)


def test_fedmas_fold_picks_the_files(tmp_path):
    data_dir = make_fedmas(tmp_path / "data", fold=2)
    check_data(load(data_dir, tmp_path, fold=2))
    with pytest.raises(DataError, match="no Fed-ISIC2019 data found"):
        load(data_dir, tmp_path)  # fold 1 files are absent


def test_auto_detection_error_lists_both_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(DataError) as error:
            load(folder, tmp_path)
        message = str(error.value)
        for expected in (str(folder), "ISIC_2019_Training_Input_preprocessed", "train_test_split",
                         "train_flamby_isic_fl_<k>_1.csv", "val_flamby_isic_fl_<k>_1.csv"):  # fmt: skip
            assert expected in message


def test_missing_fedmas_csv(tmp_path):
    data_dir = make_fedmas(tmp_path / "data")
    (data_dir / "val_flamby_isic_fl_3_1.csv").unlink()
    with pytest.raises(DataError, match="val_flamby_isic_fl_3_1.csv not found"):
        load(data_dir, tmp_path)


def test_missing_column_names_column_and_file(tmp_path):
    root = make_flamby(tmp_path / "isic")
    edit_csv(root / "train_test_split", lambda h, rows: ([c if c != "center" else "centre" for c in h], rows))
    with pytest.raises(DataError, match=r"train_test_split has no column 'center'"):
        load(root, tmp_path)
    data_dir = make_fedmas(tmp_path / "data")
    edit_csv(data_dir / "train_flamby_isic_fl_0_1.csv", lambda h, rows: (h[:2], [r[:2] for r in rows]))
    with pytest.raises(DataError, match=r"train_flamby_isic_fl_0_1.csv has no column 'dx'"):
        load(data_dir, tmp_path)


def _set(row_index, column, value):
    def change(header, rows):
        rows[row_index][header.index(column)] = value
        return header, rows

    return change


def test_label_out_of_range_names_file_line_and_value(tmp_path):
    root = make_flamby(tmp_path / "isic")
    edit_csv(root / "train_test_split", _set(4, "target", "8"))  # data row 5 is line 6
    with pytest.raises(DataError, match=r"train_test_split, line 6, column 'target': label '8' out of range"):
        load(root, tmp_path)
    data_dir = make_fedmas(tmp_path / "data")
    edit_csv(data_dir / "val_flamby_isic_fl_2_1.csv", _set(1, "dx", "FOO"))
    with pytest.raises(DataError, match=r"val_flamby_isic_fl_2_1.csv, line 3, column 'dx': unknown class 'FOO'"):
        load(data_dir, tmp_path)


def test_class_names_are_accepted_as_labels(tmp_path):
    data_dir = make_fedmas(tmp_path / "data")
    edit_csv(data_dir / "train_flamby_isic_fl_0_1.csv", lambda h, rows: (h, [[*r[:2], CLASSES[int(r[2])]] for r in rows]))
    check_data(load(data_dir, tmp_path))


def test_centre_out_of_range(tmp_path):
    root = make_flamby(tmp_path / "isic")
    edit_csv(root / "train_test_split", _set(0, "center", "6"))
    with pytest.raises(DataError, match=r"train_test_split, line 2, column 'center': centre '6' out of range"):
        load(root, tmp_path)


def test_unknown_fold_value(tmp_path):
    root = make_flamby(tmp_path / "isic")
    edit_csv(root / "train_test_split", _set(2, "fold", "valid"))
    with pytest.raises(DataError, match=r"line 4, column 'fold': unknown fold 'valid'"):
        load(root, tmp_path)


def test_missing_image_raises_and_can_be_skipped(tmp_path):
    root = make_flamby(tmp_path / "isic")
    name, client, split, label = records()[0]
    (root / "ISIC_2019_Training_Input_preprocessed" / f"{name}.jpg").unlink()
    with pytest.raises(DataError, match=rf"1 image could not be read in .*: {name}.jpg \(missing file\).*--skip_bad_images"):
        load(root, tmp_path)
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable image "):
        data = load(root, tmp_path, skip_bad_images=True, val_fraction=0.0)
    expected = [list(row) for row in (TRAIN if split == "train" else TEST)]
    expected[client][label] -= 1
    assert data.class_counts(split).tolist() == expected
    assert data.info["skipped_bad_images"] == 1 and data.info["bad_images"] == [f"{name}.jpg (missing file)"]


def test_truncated_jpeg_is_skipped_and_recorded(tmp_path):
    data_dir = make_fedmas(tmp_path / "data")
    name, client, split, label = next(r for r in records() if r[1] == 0 and r[2] == "test")
    path = tmp_path / "data" / "ISIC_2019_Training_Input" / f"{name}.jpg"
    path.write_bytes(path.read_bytes()[:-150])
    with pytest.raises(DataError, match=rf"{name}.jpg \(OSError"):
        load(data_dir, tmp_path)
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable image "):
        data = load(data_dir, tmp_path, skip_bad_images=True)
    expected = [list(row) for row in TEST]
    expected[0][label] -= 1
    assert data.class_counts("test").tolist() == expected
    assert data.info["skipped_bad_images"] == 1 and data.info["bad_images"][0].startswith(f"{name}.jpg (OSError")


def test_empty_client(tmp_path):
    root = make_flamby(tmp_path / "isic")
    edit_csv(root / "train_test_split", lambda h, rows: (h, [r for r in rows if not (r[h.index("center")] == "5" and r[h.index("fold")] == "test")]))
    with pytest.raises(DataError, match=r"client 5 \(HAM_vienna_dias\) has no test images in .*train_test_split"):
        load(root, tmp_path)


def test_empty_client_after_skipping_bad_images(tmp_path):
    data_dir = make_fedmas(tmp_path / "data")
    for name, client, split, _ in records():
        if client == 4 and split == "test":
            (tmp_path / "data" / "ISIC_2019_Training_Input" / f"{name}.jpg").unlink()
    with pytest.raises(DataError, match=r"client 4 \(MSK\) has no test images"):
        load(data_dir, tmp_path, skip_bad_images=True)


def test_class_in_test_but_not_in_train_warns(tmp_path):
    data_dir = make_fedmas(tmp_path / "data")
    edit_csv(data_dir / "val_flamby_isic_fl_1_1.csv", _set(0, "dx", "7"))  # client 1 has no SCC in train
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load(data_dir, tmp_path)
    messages = [str(w.message) for w in caught]
    assert messages == ["fed_isic2019: client 1 (HAM_vidir_molemax) has class SCC in its test split but not in its train split"]
    assert data.class_counts("test")[1, 7] == 1


def test_default_cache_round_trip_and_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDWARD_CACHE", str(tmp_path / "fw-cache"))
    root = make_flamby(tmp_path / "isic")
    first = fed_isic2019.load(data_dir=root, image_size=8, val_fraction=0.34, progress=False)
    assert first.info["cache_file"].startswith(str(tmp_path / "fw-cache" / "decoded"))
    real_decoder = imagecache.decode_one

    def refuse(*args, **kwargs):
        raise AssertionError("decoded on a cache hit")

    monkeypatch.setattr(imagecache, "decode_one", refuse)
    second = fed_isic2019.load(data_dir=root, image_size=8, val_fraction=0.34, progress=False)
    assert same(first, second) and second.info["cache_file"] == first.info["cache_file"]

    # A changed image file gives a new cache key, so it is decoded again.
    name, client, split, label = records()[3]
    path = root / "ISIC_2019_Training_Input_preprocessed" / f"{name}.jpg"
    stat = path.stat()
    Image.new("RGB", (10, 10), tuple(int(c) for c in PALETTE[label])).save(path, quality=50)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    with pytest.raises(DataError, match="decoded on a cache hit"):
        fed_isic2019.load(data_dir=root, image_size=8, val_fraction=0.34, progress=False)
    monkeypatch.setattr(imagecache, "decode_one", real_decoder)
    third = fed_isic2019.load(data_dir=root, image_size=8, val_fraction=0.34, progress=False)
    assert third.info["cache_file"] != first.info["cache_file"]
    check_data(third)


def test_val_carving_depends_on_seed_only(tmp_path):
    root = make_flamby(tmp_path / "isic")
    a = load(root, tmp_path, seed=3)
    b = load(root, tmp_path, seed=3, cache_dir=None)
    assert same(a, b)
    c = load(root, tmp_path, seed=4)
    assert torch.equal(c.class_counts("val"), a.class_counts("val"))


@pytest.mark.parametrize("edit, client, prefix, text", [
    (lambda rows, other: [*rows, rows[0]], 0, "train", "is listed twice in the train split of client 0"),
    (lambda rows, other: [*rows, [str(len(rows)), other[0][1], other[0][2]]], 2, "train",
     "is listed for client 1 (HAM_vidir_molemax) and client 2 (HAM_vidir_modern): an image belongs to one hospital"),
    (lambda rows, other: [*rows, [str(len(rows)), other[0][1], other[0][2]]], 3, "val",
     "is in both the train and the test split of client 3 (HAM_rosendahl): a leak"),
])
def test_an_image_listed_twice_is_named_with_both_rows(tmp_path, edit, client, prefix, text):
    data_dir = make_fedmas(tmp_path / "fm")
    source = {2: (1, "train"), 3: (3, "train"), 0: (0, "train")}[client]
    with open(data_dir / f"{source[1]}_flamby_isic_fl_{source[0]}_1.csv", newline="") as handle:
        other = list(csv.reader(handle))[1:]
    target = data_dir / f"{prefix}_flamby_isic_fl_{client}_1.csv"
    edit_csv(target, lambda header, rows: (header, edit(rows, other)))
    with pytest.raises(DataError, match=re.escape(text)) as raised:
        load(data_dir, tmp_path)
    message = str(raised.value)
    assert f"{target}, line" in message and "first listed at" in message and "--listing_overlap warn" in message
    with pytest.warns(RuntimeWarning, match="1 image\\(s\\) listed more than once"):
        data = load(data_dir, tmp_path, listing_overlap="warn")
    assert data.info["num_images"] == len(records()) + 1  # kept as listed


def test_flamby_rows_listed_twice_are_refused(tmp_path):
    root = make_flamby(tmp_path / "fl")
    edit_csv(root / "train_test_split", lambda header, rows: (header, [*rows, rows[0]]))
    with pytest.raises(DataError, match="train_test_split, line .*: image .* is listed twice"):
        load(root, tmp_path)
