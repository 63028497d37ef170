"""MedMNIST (v2/v3) single-label classification sets, split over simulated clients.

fedward reads the official ``.npz`` files that ``medmnist`` downloads (it never downloads them
itself): ``<data_dir>/<flag>.npz`` (28 x 28) or ``<data_dir>/<flag>_<size>.npz`` (size 64, 128 or
224), holding ``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images`` and
``test_labels``. Images are uint8 (N, H, W) grey or (N, H, W, 3) RGB; labels (N, 1) integers.
Multi-label sets (``chestmnist``, labels (N, 14)) are rejected: fedward trains single-label
classifiers.

Grey images are repeated to three channels; images are resized to ``image_size`` (bilinear with
antialiasing) when their size differs.

Splits:

- train: the official train set, partitioned over ``num_clients`` clients by
  ``fedward.data.partition.partition_indices`` (``iid``/``homo``, ``dirichlet``/``hetero`` with
  ``alpha``, or ``pathological`` with ``classes_per_client``).
- val: with ``val_fraction=None`` (default) the official val set, split so every client's val
  set follows its own train label distribution: the val images of class c go to the clients in
  proportion to how many train images of class c each client holds. With a ``val_fraction`` the
  official val set is not used and val is carved, stratified, from each client's train share.
- test: the official test set split iid (a random, equal-sized, disjoint share per client), so
  the clients' test sets together are exactly the official test set and pooled test metrics are
  the official benchmark's.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedward.data.partition import carve_validation, partition_indices
from fedward.data.types import ClientData, FederatedData, Split
from fedward.errors import ConfigError, DataError
from fedward.seeding import numpy_generator
from fedward.data.registry import register_dataset
from fedward.options import option

NAME = "medmnist"
# The client count, class count and class names depend on the arguments of ``load`` (``num_clients``
# and the MedMNIST ``flag``), so they are not fixed for the module: see ``KNOWN_FLAGS`` and the
# returned ``FederatedData``.
NUM_CLIENTS = None
NUM_CLASSES = None
CLASS_NAMES = None
CLIENT_NAMES = None  # clients are "client 0", "client 1", ...

# Single-label MedMNIST 2D flags -> number of classes.
KNOWN_FLAGS: dict[str, int] = {
    "pathmnist": 9,
    "dermamnist": 7,
    "octmnist": 4,
    "pneumoniamnist": 2,
    "retinamnist": 5,
    "breastmnist": 2,
    "bloodmnist": 8,
    "tissuemnist": 8,
    "organamnist": 11,
    "organcmnist": 11,
    "organsmnist": 11,
}
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
RESIZE_CHUNK = 512  # images resized at once


def npz_path(data_dir: Path, flag: str, size: int | None) -> Path:
    """``<data_dir>/<flag>.npz`` for the 28 x 28 files (``size`` None or 28), else ``<flag>_<size>.npz``."""
    return data_dir / (f"{flag}.npz" if size in (None, 28) else f"{flag}_{size}.npz")


def _read_array(archive, path: Path, key: str) -> np.ndarray:
    if key not in archive.files:
        raise DataError(f"{path} has no key {key!r}; expected the MedMNIST keys "
                        f"{', '.join(f'{s}_images, {s}_labels' for s in SPLITS)} (found: {', '.join(archive.files) or 'none'})")  # fmt: skip
    try:
        return archive[key]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"could not read key {key!r} of {path}: {error}") from None


def read_split(archive, path: Path, split: str, flag: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels int64 (N,)) of ``split``, checked."""
    images = _read_array(archive, path, f"{split}_images")
    labels = _read_array(archive, path, f"{split}_labels")
    key = f"{split}_images"
    if images.dtype != np.uint8:
        raise DataError(f"{path}, key {key!r}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{path}, key {key!r}: expected images of shape (N, H, W) or (N, H, W, 3), got {images.shape}")
    key = f"{split}_labels"
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise DataError(f"{path}, key {key!r}: labels have shape {labels.shape}: {flag!r} is a multi-label data set "
                        f"and fedward only reads single-label classification sets (labels of shape (N, 1))")  # fmt: skip
    if labels.ndim not in (1, 2):
        raise DataError(f"{path}, key {key!r}: expected labels of shape (N, 1), got {labels.shape}")
    labels = labels.reshape(-1)
    if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path}, key {key!r}: labels must be integers, got {labels.dtype}")
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images in {split + '_images'!r} but {len(labels)} labels in {key!r}")
    return images, labels.astype(np.int64)


def to_tensor(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 (N, H, W, 1|3) -> uint8 (N, 3, image_size, image_size); grey repeated to RGB, resized
    (bilinear, antialiased) when the size differs."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    if tuple(tensor.shape[2:]) == (image_size, image_size):
        return tensor.contiguous()
    out = torch.empty(len(tensor), 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, len(tensor), RESIZE_CHUNK):
        chunk = tensor[start : start + RESIZE_CHUNK].float()
        resized = F.interpolate(chunk, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + RESIZE_CHUNK] = resized.round().clamp(0, 255).to(torch.uint8)
    return out


def split_like(labels: np.ndarray, train_counts: np.ndarray, generator: np.random.Generator) -> list[np.ndarray]:
    """Split indices of ``labels`` over clients so client k gets about ``train_counts[k, c] /
    train_counts[:, c].sum()`` of class c (equal shares for a class no client trains on).
    Every index is used exactly once; each returned array is sorted."""
    num_clients = train_counts.shape[0]
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = generator.permutation(np.flatnonzero(labels == label))
        weights = train_counts[:, label].astype(float) if label < train_counts.shape[1] else np.zeros(num_clients)
        if weights.sum() == 0:
            weights = np.ones(num_clients)
        cuts = np.floor(np.cumsum(weights / weights.sum()) * len(members) + 0.5).astype(int)[:-1]
        for part, piece in zip(parts, np.split(members, cuts)):
            part.extend(piece.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def load(
    *,
    data_dir: str | Path,
    flag: str = "dermamnist",
    size: int | None = None,
    image_size: int = 28,
    num_clients: int = 4,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    classes_per_client: int = 2,
    val_fraction: float | None = None,
    num_classes: int | None = None,
) -> FederatedData:
    """Load MedMNIST ``flag`` from ``data_dir`` and split it over ``num_clients`` clients.

    ``size`` picks the file (None or 28: ``<flag>.npz``; 64/128/224: ``<flag>_<size>.npz``);
    ``image_size`` is the size images are resized to. ``num_classes`` defaults to the flag's known
    class count (``KNOWN_FLAGS``), else to the largest label + 1. See the module docstring for how
    train, val and test are split.
    """
    flag = str(flag).lower()
    if size is not None and size not in SIZES:
        raise ConfigError(f"MedMNIST size must be one of {', '.join(map(str, SIZES))} (or None), got {size!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8, got {image_size!r}")
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1) or None (use the official val set), got {val_fraction}")
    data_dir = Path(data_dir).expanduser()
    path = npz_path(data_dir, flag, size)
    if not path.is_file():
        if not data_dir.is_dir():
            raise DataError(f"MedMNIST data folder {data_dir} does not exist (looking for {path.name})")
        found = sorted(p.name for p in data_dir.glob("*.npz"))
        raise DataError(f"MedMNIST file {path} not found; .npz files in {data_dir}: {', '.join(found) or 'none'}")

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {split: read_split(archive, path, split, flag) for split in SPLITS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"could not read MedMNIST file {path}: {error}") from None

    if num_classes is None:
        num_classes = KNOWN_FLAGS.get(flag) or int(max(labels.max(initial=-1) for _, labels in arrays.values())) + 1
    if num_classes < 2:
        raise DataError(f"{path}: found {num_classes} class(es); need at least 2")
    for split, (_, labels) in arrays.items():
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if len(bad):
            raise DataError(f"{path}, key {split + '_labels'!r}: label {int(labels[bad[0]])} at index {int(bad[0])} out of range; "
                            f"expected 0..{num_classes - 1} for {flag!r} ({len(bad)} bad label(s))")  # fmt: skip

    original_size = list(arrays["train"][0].shape[1:3])
    splits = {
        split: Split(to_tensor(images, image_size), torch.from_numpy(labels))
        for split, (images, labels) in arrays.items()
    }
    del arrays
    train_labels = splits["train"].labels.numpy()
    train_parts = partition_indices(
        train_labels, num_clients, partition, alpha=alpha, classes_per_client=classes_per_client,
        generator=numpy_generator(seed, NAME, flag, "partition"),
    )  # fmt: skip
    train_counts = np.stack([np.bincount(train_labels[p], minlength=num_classes)[:num_classes] for p in train_parts])
    test_parts = partition_indices(splits["test"].labels.numpy(), num_clients, "iid", generator=numpy_generator(seed, NAME, flag, "test"))
    if val_fraction is None:
        val_parts = split_like(splits["val"].labels.numpy(), train_counts, numpy_generator(seed, NAME, flag, "val"))

    clients = []
    for k in range(num_clients):
        train = splits["train"].subset(torch.from_numpy(train_parts[k]))
        if val_fraction is None:
            val = splits["val"].subset(torch.from_numpy(val_parts[k]))
        else:
            train, val = carve_validation(train, val_fraction, numpy_generator(seed, NAME, flag, "carve", k))
        test = splits["test"].subset(torch.from_numpy(test_parts[k]))
        clients.append(ClientData(k, f"client {k}", train, val, test))

    def table(split: str) -> list[list[int]]:
        return [getattr(c, split).class_counts(num_classes).tolist() for c in clients]

    info = {
        "source": NAME,
        "flag": flag,
        "file": str(path),
        "image_size": image_size,
        "original_size": original_size,
        "partition": partition,
        "alpha": alpha,
        "classes_per_client": classes_per_client,
        "seed": seed,
        "val": "official val set, split like train" if val_fraction is None else f"carved from train ({val_fraction})",
        "val_fraction": val_fraction,
        "test": "official test set, split iid",
        "counts": {split: table(split) for split in SPLITS},
    }
    class_names = [str(c) for c in range(num_classes)]
    return FederatedData(NAME, num_classes, class_names, image_size, clients, info=info)


@dataclass
class Options:
    data_flag: str = option("dermamnist", "the <flag>.npz file to read in --data_dir (dermamnist, pathmnist, ...)")


@register_dataset(NAME, options=Options, needs_data_dir=True, splits_clients=True)
def from_config(cfg) -> FederatedData:
    """MedMNIST <flag>.npz from --data_dir, split over --client_number clients"""
    # MedMNIST has no natural clients: the loader splits the official train set itself.
    method = {"natural": "dirichlet", "homo": "iid"}.get(cfg.partition_method, cfg.partition_method)
    return load(data_dir=cfg.data_dir, flag=cfg.data_flag, image_size=cfg.image_size,
                num_clients=cfg.client_number or 4, partition=method, alpha=cfg.partition_alpha, seed=cfg.data_seed,
                classes_per_client=cfg.classes_per_client)
