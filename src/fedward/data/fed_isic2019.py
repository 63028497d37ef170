"""Fed-ISIC2019 (FLamby): six hospitals, eight skin-lesion classes, FLamby's official split.

Two on-disk layouts are read:

- ``flamby``: what FLamby's download and preprocessing scripts leave behind,
  ``<data_dir>/ISIC_2019_Training_Input_preprocessed/<image>.jpg``, plus FLamby's split file
  ``train_test_split`` (CSV columns ``image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK, target,
  center, fold, fold2``; fedward reads ``image``, ``target``, ``center`` and ``fold``). FLamby ships
  that file in its repository (``flamby/datasets/fed_isic2019/dataset_creation_scripts/``); fedward
  does not ship it: pass ``split_csv`` or copy it to ``<data_dir>/train_test_split``.
- ``fedmas``: the official Fed-MAS code's layout, ``data_dir`` = ``data/Flamby_isic`` holding
  ``train_flamby_isic_fl_<k>_<fold>.csv`` and ``val_flamby_isic_fl_<k>_<fold>.csv`` (columns
  ``,image_name,dx``: an unnamed index column, the image id without extension, the label 0..7),
  with the raw ISIC 2019 JPEGs in the sibling folder ``data/ISIC_2019_Training_Input/``.

Both give FLamby's split (Fed-MAS's fold-1 CSVs are FLamby's ``train_test_split`` row for row).
Every client's val split is carved, stratified, from its own train split; the test split is the
official test split. Images are decoded once (shorter side to ``image_size``, centre crop) into
the image cache (``fedward.data.imagecache``).
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from fedward.data.imagecache import decode_splits
from fedward.data.partition import carve_validation
from fedward.data.types import ClientData, FederatedData
from fedward.errors import ConfigError, DataError
from fedward.seeding import numpy_generator
from fedward.data.registry import ImageFiles, register_dataset
from fedward.options import option

NAME = "fed_isic2019"
NUM_CLIENTS = 6
NUM_CLASSES = 8
CLASS_NAMES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
# FLamby's centre order (centre ids 0..5 in ``train_test_split``).
CLIENT_NAMES = ["BCN", "HAM_vidir_molemax", "HAM_vidir_modern", "HAM_rosendahl", "MSK", "HAM_vienna_dias"]

LAYOUTS = ("auto", "flamby", "fedmas")
FLAMBY_IMAGE_DIR = "ISIC_2019_Training_Input_preprocessed"
FLAMBY_SPLIT_FILE = "train_test_split"
FLAMBY_COLUMNS = ("image", "target", "center", "fold")
FEDMAS_IMAGE_DIR = "ISIC_2019_Training_Input"  # a sibling of data_dir (Fed-MAS: data/ISIC_2019_Training_Input)
FEDMAS_COLUMNS = ("image_name", "dx")
SPLITS = ("train", "test")
MAX_LISTED = 20


def fedmas_csv(data_dir: Path, split: str, client: int, fold: int) -> Path:
    """Fed-MAS's CSV for ``client``: its ``train`` file, or its ``val`` file (which is the test set)."""
    prefix = "train" if split == "train" else "val"
    return data_dir / f"{prefix}_flamby_isic_fl_{client}_{fold}.csv"


def _expected_layouts(data_dir: Path, fold: int) -> str:
    return (f"flamby: {data_dir / FLAMBY_IMAGE_DIR}/<image>.jpg and the split file {data_dir / FLAMBY_SPLIT_FILE} "
            f"(or pass split_csv); fedmas: {data_dir}/train_flamby_isic_fl_<k>_{fold}.csv and "
            f"val_flamby_isic_fl_<k>_{fold}.csv for k = 0..5, with images in {data_dir.parent / FEDMAS_IMAGE_DIR}")  # fmt: skip


def detect_layout(data_dir: Path, split_csv: Path | None, fold: int) -> str:
    """``flamby`` or ``fedmas``, by which files exist in ``data_dir``."""
    if split_csv is not None:
        return "flamby"
    fedmas = any(fedmas_csv(data_dir, split, k, fold).is_file() for split in SPLITS for k in range(NUM_CLIENTS))
    flamby = (data_dir / FLAMBY_SPLIT_FILE).is_file() or (data_dir / FLAMBY_IMAGE_DIR).is_dir()
    if fedmas and flamby:
        raise DataError(f"{data_dir} holds both a FLamby and a Fed-MAS Fed-ISIC2019 layout; pass layout='flamby' or 'fedmas'")
    if fedmas:
        return "fedmas"
    if flamby:
        return "flamby"
    if not data_dir.is_dir():
        raise DataError(f"Fed-ISIC2019 data folder {data_dir} does not exist; expected one of two layouts: {_expected_layouts(data_dir, fold)}")
    raise DataError(f"no Fed-ISIC2019 data found in {data_dir}; expected one of two layouts: {_expected_layouts(data_dir, fold)}")


def read_csv(path: Path, required: tuple[str, ...], what: str) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for every data row of ``path``, after checking the ``required`` columns."""
    if not path.is_file():
        raise DataError(f"{what} {path} not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in required if c not in columns]
            if missing:
                raise DataError(f"{path} has no column {', '.join(repr(c) for c in missing)}; expected columns {', '.join(required)} (found: {', '.join(columns) or 'none'})")
            rows = []
            for row in reader:
                stripped = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in row.items()}
                rows.append((reader.line_num, stripped))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"could not read {path}: {error}") from None
    return rows


def _where(path: Path, line: int, column: str) -> str:
    return f"{path}, line {line}, column {column!r}"


def parse_label(value: str, path: Path, line: int, column: str) -> int:
    """A class id 0..7 from an integer (``3``, ``3.0``) or a class name (``AK``)."""
    try:
        number = float(value)
    except ValueError:
        if value.upper() in CLASS_NAMES:
            return CLASS_NAMES.index(value.upper())
        raise DataError(f"{_where(path, line, column)}: unknown class {value!r}; expected 0..{NUM_CLASSES - 1} or one of {', '.join(CLASS_NAMES)}") from None
    if not number.is_integer() or not 0 <= number < NUM_CLASSES:
        raise DataError(f"{_where(path, line, column)}: label {value!r} out of range; expected an integer 0..{NUM_CLASSES - 1}")
    return int(number)


def parse_centre(value: str, path: Path, line: int, column: str) -> int:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number.is_integer() or not 0 <= number < NUM_CLIENTS:
        raise DataError(f"{_where(path, line, column)}: centre {value!r} out of range; expected an integer 0..{NUM_CLIENTS - 1}")
    return int(number)


def _image_file(folder: Path, name: str, path: Path, line: int, column: str) -> Path:
    if not name:
        raise DataError(f"{_where(path, line, column)}: empty image name")
    return folder / (name if name.lower().endswith(".jpg") else f"{name}.jpg")


Listing = dict[tuple[int, str], list[tuple[Path, int]]]  # (client, "train"/"test") -> [(image file, label)]
OVERLAP_CHOICES = ("error", "warn")


class ListingOverlap:
    """Finds an image listed twice: in one split, for two clients, or in a client's train and test
    splits (a test image the model trains on). ``error`` stops at the first; ``warn`` keeps the rows
    as listed and warns once with the count."""

    def __init__(self, mode: str = "error"):
        self.mode, self.first, self.found = mode, {}, []

    def add(self, image: Path, centre: int, split: str, where: str) -> None:
        key = image.name.lower()
        if key not in self.first:
            self.first[key] = (centre, split, where)
            return
        first_centre, first_split, first_where = self.first[key]
        if first_centre != centre:
            what = (f"is listed for client {first_centre} ({CLIENT_NAMES[first_centre]}) and client {centre} "
                    f"({CLIENT_NAMES[centre]}): an image belongs to one hospital")
        elif first_split != split:
            what = f"is in both the train and the test split of client {centre} ({CLIENT_NAMES[centre]}): a leak"
        else:
            what = f"is listed twice in the {split} split of client {centre} ({CLIENT_NAMES[centre]})"
        message = f"{where}: image {image.name} {what} (first listed at {first_where})"
        if self.mode == "error":
            raise DataError(f"{message}; fix the split files or pass --listing_overlap warn")
        self.found.append(message)

    def warn(self) -> None:
        if self.found:
            warnings.warn(f"{NAME}: {len(self.found)} image(s) listed more than once, kept as listed "
                          f"(--listing_overlap warn); first: {self.found[0]}", RuntimeWarning, stacklevel=3)


def read_flamby(data_dir: Path, split_csv: Path, overlap: ListingOverlap) -> tuple[Listing, list[str]]:
    """FLamby's ``train_test_split``: the ``fold`` column gives the official train/test split."""
    listing: Listing = {(k, s): [] for k in range(NUM_CLIENTS) for s in SPLITS}
    folder = data_dir / FLAMBY_IMAGE_DIR
    for line, row in read_csv(split_csv, FLAMBY_COLUMNS, "FLamby split file"):
        label = parse_label(row["target"], split_csv, line, "target")
        centre = parse_centre(row["center"], split_csv, line, "center")
        split = row["fold"].lower()
        if split not in SPLITS:
            raise DataError(f"{_where(split_csv, line, 'fold')}: unknown fold {row['fold']!r}; expected 'train' or 'test'")
        image = _image_file(folder, row["image"], split_csv, line, "image")
        overlap.add(image, centre, split, f"{split_csv}, line {line}")
        listing[centre, split].append((image, label))
    return listing, [str(split_csv)]


def read_fedmas(data_dir: Path, fold: int, overlap: ListingOverlap) -> tuple[Listing, list[str]]:
    """Fed-MAS's per-client CSVs. Its ``train_..`` file becomes fedward's train split (val is carved
    from it); its ``val_..`` file is FLamby's test split, so it becomes fedward's test split."""
    listing: Listing = {}
    folder = data_dir.parent / FEDMAS_IMAGE_DIR
    files = []
    for centre in range(NUM_CLIENTS):
        for split in SPLITS:
            path = fedmas_csv(data_dir, split, centre, fold)
            listing[centre, split] = []
            for line, row in read_csv(path, FEDMAS_COLUMNS, f"Fed-MAS split file (fold {fold})"):
                image = _image_file(folder, row["image_name"], path, line, "image_name")
                overlap.add(image, centre, split, f"{path}, line {line}")
                listing[centre, split].append((image, parse_label(row["dx"], path, line, "dx")))
            files.append(str(path))
    return listing, files


def _check_clients(listing: Listing, source: str) -> None:
    for (centre, split), items in listing.items():
        if not items:
            raise DataError(f"client {centre} ({CLIENT_NAMES[centre]}) has no {split} images in {source}")


def _warn_missing_train_classes(clients: list[ClientData], train_labels: list[torch.Tensor]) -> None:
    for client, labels in zip(clients, train_labels):
        train_present = set(labels.tolist())
        for cls in sorted(set(client.test.labels.tolist()) - train_present):
            warnings.warn(f"{NAME}: client {client.client_id} ({client.name}) has class {CLASS_NAMES[cls]} in its test split "
                          f"but not in its train split", RuntimeWarning, stacklevel=3)  # fmt: skip


def load(
    *,
    data_dir: str | Path,
    image_size: int = 224,
    val_fraction: float = 0.1,
    seed: int = 0,
    layout: str = "auto",
    split_csv: str | Path | None = None,
    fold: int = 1,
    cache_dir: str | Path | None = None,
    skip_bad_images: bool = False,
    listing_overlap: str = "error",
    progress: bool = True,
) -> FederatedData:
    """Load Fed-ISIC2019 from ``data_dir`` in the ``flamby`` or ``fedmas`` layout (``auto``: detect).

    ``fold`` picks the Fed-MAS CSV files (only fold 1, FLamby's split, exists). Images that cannot
    be read raise ``DataError`` unless ``skip_bad_images`` (then they are left out and listed in
    ``info``). An image listed twice (in a split, for two clients, in train and test) is an error
    unless ``listing_overlap`` is ``warn``.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown Fed-ISIC2019 layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8, got {image_size!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if listing_overlap not in OVERLAP_CHOICES:
        raise ConfigError(f"listing_overlap must be one of {', '.join(OVERLAP_CHOICES)}, got {listing_overlap!r}")
    overlap = ListingOverlap(listing_overlap)
    data_dir = Path(data_dir).expanduser()
    split_path = Path(split_csv).expanduser() if split_csv is not None else None
    if layout == "auto":
        layout = detect_layout(data_dir, split_path, fold)
    if layout == "flamby":
        if fold != 1:
            raise ConfigError(f"the flamby layout has one official split (fold 1), got fold={fold}")
        listing, split_files = read_flamby(data_dir, split_path or data_dir / FLAMBY_SPLIT_FILE, overlap)
    else:
        if split_path is not None:
            raise ConfigError("split_csv is only for the flamby layout; the fedmas layout reads its per-client CSVs from data_dir")
        listing, split_files = read_fedmas(data_dir, fold, overlap)
    overlap.warn()
    _check_clients(listing, ", ".join(split_files) if len(split_files) == 1 else str(data_dir))

    # One cache for the whole data set, ordered client by client, train then test: every split is
    # then a contiguous slice (a view) of the cache.
    order = [(centre, split) for centre in range(NUM_CLIENTS) for split in SPLITS]
    parts, decoded = decode_splits(listing, order, image_size, cache_dir=cache_dir, skip_bad=skip_bad_images,
                                   progress=progress)
    if decoded.bad:
        _check_clients({key: range(len(split)) for key, split in parts.items()}, f"{data_dir} after skipping unreadable images")

    clients, train_labels = [], []
    for centre in range(NUM_CLIENTS):
        train = parts[centre, "train"]
        rest, val = carve_validation(train, val_fraction, numpy_generator(seed, NAME, "val", centre))
        clients.append(ClientData(centre, CLIENT_NAMES[centre], rest, val, parts[centre, "test"]))
        train_labels.append(train.labels)
    _warn_missing_train_classes(clients, train_labels)

    def table(split: str) -> list[list[int]]:
        return [getattr(c, split).class_counts(NUM_CLASSES).tolist() for c in clients]

    info = {
        "source": NAME,
        "layout": layout,
        "data_dir": str(data_dir),
        "split_files": split_files,
        "fold": fold,
        "image_size": image_size,
        "val_fraction": val_fraction,
        "seed": seed,
        "counts": {split: table(split) for split in ("train", "val", "test")},
        "num_images": len(decoded.kept),
        "skipped_bad_images": len(decoded.bad),
        "bad_images": [f"{path.name} ({reason})" for path, reason in decoded.bad[:MAX_LISTED]],
        "cache_file": str(decoded.cache_file) if decoded.cache_file else None,
    }
    if decoded.bad:
        noun = "image" if len(decoded.bad) == 1 else "images"
        warnings.warn(f"{NAME}: skipped {len(decoded.bad)} unreadable {noun} (first: {info['bad_images'][0]})", RuntimeWarning, stacklevel=2)
    return FederatedData(NAME, NUM_CLASSES, list(CLASS_NAMES), image_size, clients, info=info)


@dataclass
class Options(ImageFiles):
    fold: int = option(1, "data fold (the reference ships fold 1 only)", check=(lambda v: v >= 1, "at least 1"))
    listing_overlap: str = option("error", "an image the split files list twice, for two clients or in train and "
                                           "test: error, or warn and keep the rows as listed", choices=OVERLAP_CHOICES)


@register_dataset(NAME, options=Options, needs_data_dir=True)
def from_config(cfg) -> FederatedData:
    """Fed-ISIC2019 from --data_dir, FLamby or Fed-MAS layout"""
    return load(data_dir=cfg.data_dir, image_size=cfg.image_size, val_fraction=cfg.val_fraction, seed=cfg.data_seed,
                fold=cfg.fold, skip_bad_images=cfg.skip_bad_images, listing_overlap=cfg.listing_overlap,
                progress=cfg.progress)
