"""Your own hospitals' images, one folder per client: ``<data_dir>/<client>/<split>/<class>/<image>``.

- ``<client>``: every sub-folder of ``data_dir`` (sorted by name; hidden folders are ignored) is one
  client, named after its folder.
- ``<split>``: ``train`` (required), ``test`` (required) and ``val`` (optional: when a client has
  no ``val`` folder, its val split is carved, stratified, from its train images with
  ``val_fraction``).
- ``<class>``: the class folders. The classes are the union of the class folder names over all
  clients and splits, sorted, so a class one client lacks still has the same index everywhere.
  Images may sit in sub-folders of a class folder.
- images: ``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.tif``, ``.tiff``, and DICOM ``.dcm``,
  ``.dicom`` (any case); other files are ignored. Image files directly under ``<client>/`` or
  ``<client>/<split>/`` have no class: they are left out with a warning naming them.

DICOM files are read with the optional pydicom (``pip install "fedward[dicom]"``; without it a
DICOM file is a ``DataError`` naming it and the install command): the first frame, with the
modality LUT (rescale) and VOI LUT / window applied when present, ``MONOCHROME1`` inverted, scaled
to 0..255 by the image's own min and max, grayscale copied to 3 channels (see
``fedward.data.imagecache.read_dicom``). A DICOM file pydicom cannot read (corrupt, or compressed
with a transfer syntax no installed decoder handles) is an unreadable image like any other. Every
image is decoded once (shorter side to ``image_size``, centre crop) through the image cache
(``fedward.data.imagecache``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path


from fedward.data.imagecache import DICOM_SUFFIXES, decode_splits
from fedward.data.partition import carve_validation
from fedward.data.types import ClientData, FederatedData
from fedward.errors import ConfigError, DataError
from fedward.seeding import numpy_generator
from fedward.data.registry import ImageFiles, register_dataset

NAME = "folders"
# Clients and classes are discovered from the folders at load time; see the returned FederatedData.
NUM_CLIENTS = None
NUM_CLASSES = None
CLASS_NAMES = None
CLIENT_NAMES = None

DICOM_EXTENSIONS = DICOM_SUFFIXES  # (".dcm", ".dicom"), read with pydicom
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", *DICOM_EXTENSIONS)
SPLITS = ("train", "val", "test")
MAX_LISTED = 20

# (client, split) -> [(path, class name)]
Listing = dict[tuple[str, str], list[tuple[Path, str]]]


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _listed(paths: list[Path], root: Path) -> str:
    names = [str(p.relative_to(root)) for p in paths[:MAX_LISTED]]
    more = f" (+{len(paths) - MAX_LISTED} more)" if len(paths) > MAX_LISTED else ""
    return ", ".join(names) + more


def scan(data_dir: Path) -> tuple[list[str], list[str], Listing, list[Path]]:
    """(client names, class names, listing, misplaced image files) of the tree under ``data_dir``."""
    if not data_dir.is_dir():
        raise DataError(f"image folder root {data_dir} does not exist; expected <root>/<client>/<train|val|test>/<class>/<image>")
    clients = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and _visible(p))
    if not clients:
        raise DataError(f"no client folders in {data_dir}; expected <root>/<client>/<train|val|test>/<class>/<image>")
    listing: Listing = {}
    classes: set[str] = set()
    misplaced: list[Path] = sorted(p for p in data_dir.iterdir() if _is_image(p))
    for client in clients:
        folder = data_dir / client
        if not (folder / "train").is_dir():
            found = sorted(p.name for p in folder.iterdir() if _visible(p))
            raise DataError(f"client folder {folder} has no train folder; expected {folder}/train/<class>/<image> "
                            f"(found: {', '.join(found) or 'nothing'})")  # fmt: skip
        if not (folder / "test").is_dir():
            raise DataError(f"client folder {folder} has no test folder; expected {folder}/test/<class>/<image>")
        unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and _visible(p) and p.name not in SPLITS)
        if unknown:
            warnings.warn(f"{NAME}: ignoring folder(s) {', '.join(unknown)} in {folder}; expected {', '.join(SPLITS)}",
                          RuntimeWarning, stacklevel=3)  # fmt: skip
        misplaced.extend(sorted(p for p in folder.iterdir() if _is_image(p)))
        for split in SPLITS:
            split_dir = folder / split
            if not split_dir.is_dir():
                continue
            misplaced.extend(sorted(p for p in split_dir.iterdir() if _is_image(p)))
            items = []
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and _visible(p)):
                files = sorted(p for p in class_dir.rglob("*") if _is_image(p) and not any(
                    part.startswith(".") for part in p.relative_to(class_dir).parts))  # fmt: skip
                _check_inside(files, split_dir)
                items.extend((path, class_dir.name) for path in files)
                classes.add(class_dir.name)
            listing[client, split] = items
    _check_split_folders_apart([data_dir / client / split for client, split in listing])
    return clients, sorted(classes), listing, misplaced


def _check_inside(files: list[Path], split_dir: Path) -> None:
    """Links below a split folder stay inside it: a class folder linked to ``../../..`` would crawl
    other trees, one linked to ``../test`` would train on the test images."""
    real = split_dir.resolve()
    for path in files:
        target = path.resolve()
        if not target.is_relative_to(real):
            raise DataError(f"{path} is a link to {target}, outside its split folder {split_dir}; "
                            "links below a split folder must stay inside it (copy the images instead)")


def _check_split_folders_apart(split_dirs: list[Path]) -> None:
    """No two split folders are one folder, or one inside the other, once links are resolved (a
    client's train linked to its test, two clients linked to one hospital's images)."""
    real = sorted((d.resolve(), d) for d in split_dirs)
    for (first_real, first), (second_real, second) in zip(real, real[1:]):
        if second_real.is_relative_to(first_real):
            raise DataError(f"{second} and {first} are the same images once links are resolved ({second_real}); "
                            "every split folder must hold its own images")


def load(
    *,
    data_dir: str | Path,
    image_size: int = 224,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    skip_bad_images: bool = False,
    progress: bool = True,
) -> FederatedData:
    """Load the per-client image folders under ``data_dir`` (layout: see the module docstring).

    ``val_fraction`` is used only for clients without a ``val`` folder. Images that cannot be read
    raise ``DataError`` unless ``skip_bad_images`` (then they are left out and listed in ``info``).
    """
    if not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8, got {image_size!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    data_dir = Path(data_dir).expanduser()
    client_names, class_names, listing, misplaced = scan(data_dir)
    if misplaced:
        noun = "file" if len(misplaced) == 1 else "files"
        warnings.warn(f"{NAME}: ignoring {len(misplaced)} image {noun} outside a class folder in {data_dir} "
                      f"(expected <client>/<split>/<class>/<image>): {_listed(misplaced, data_dir)}", RuntimeWarning, stacklevel=2)  # fmt: skip
    for client in client_names:
        if not listing[client, "train"]:
            raise DataError(f"client {client!r} has no training images in {data_dir / client / 'train'}/<class>/")
    if len(class_names) < 2:
        raise DataError(f"found {len(class_names)} class folder(s) in {data_dir} ({', '.join(class_names) or 'none'}); need at least 2")
    index = {name: i for i, name in enumerate(class_names)}

    # One cache for the whole data set, client by client, train, val, test: every split is a
    # contiguous slice (a view) of the decoded tensor.
    order = [(client, split) for client in client_names for split in SPLITS if (client, split) in listing]
    numbered = {key: [(path, index[name]) for path, name in listing[key]] for key in order}
    parts, decoded = decode_splits(numbered, order, image_size, cache_dir=cache_dir, skip_bad=skip_bad_images,
                                   progress=progress)
    for client in client_names:
        if len(parts[client, "train"]) == 0:
            raise DataError(f"client {client!r} has no readable training images in {data_dir / client / 'train'} after skipping unreadable images")

    clients, val_source = [], {}
    for k, client in enumerate(client_names):
        train = parts[client, "train"]
        if (client, "val") in parts:
            val = parts[client, "val"]
            val_source[client] = "folder"
        else:
            train, val = carve_validation(train, val_fraction, numpy_generator(seed, NAME, "val", client))
            val_source[client] = f"carved from train ({val_fraction})"
        clients.append(ClientData(k, client, train, val, parts[client, "test"]))

    num_classes = len(class_names)

    def table(split: str) -> list[list[int]]:
        return [getattr(c, split).class_counts(num_classes).tolist() for c in clients]

    bad = [f"{path} ({reason})" for path, reason in decoded.bad[:MAX_LISTED]]
    info = {
        "source": NAME,
        "data_dir": str(data_dir),
        "clients": list(client_names),
        "classes": list(class_names),
        "image_size": image_size,
        "val_fraction": val_fraction,
        "val_source": val_source,
        "seed": seed,
        "counts": {split: table(split) for split in SPLITS},
        "num_images": len(decoded.kept),
        "misplaced_images": [str(p) for p in misplaced[:MAX_LISTED]],
        "skipped_bad_images": len(decoded.bad),
        "bad_images": bad,
        "cache_file": str(decoded.cache_file) if decoded.cache_file else None,
    }
    if decoded.bad:
        noun = "image" if len(decoded.bad) == 1 else "images"
        warnings.warn(f"{NAME}: skipped {len(decoded.bad)} unreadable {noun} (first: {bad[0]})", RuntimeWarning, stacklevel=2)
    return FederatedData(NAME, num_classes, class_names, image_size, clients, info=info)


@dataclass
class Options(ImageFiles):
    pass


@register_dataset(NAME, options=Options, needs_data_dir=True)
def from_config(cfg) -> FederatedData:
    """per-hospital image folders from --data_dir: <client>/<train|val|test>/<class>/*"""
    return load(data_dir=cfg.data_dir, image_size=cfg.image_size, val_fraction=cfg.val_fraction, seed=cfg.data_seed,
                skip_bad_images=cfg.skip_bad_images, progress=cfg.progress)
