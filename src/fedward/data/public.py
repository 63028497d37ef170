"""Public data for the methods that exchange knowledge on it (FedMD, FedDF, DS-FL, KT-pFL ...).

A public set is images every client (and the server) may hold: the data set's built-in public
split (images of the same task that no client holds; ``register_dataset(public=...)``) or a folder
given with ``--public_data``:

- ``<dir>/<class>/<image>`` with class folders named like the data set's classes: labelled;
- images anywhere below ``<dir>`` and no folder named like a class: unlabelled (labels -1).

Images are decoded once through the image cache (shorter side to ``image_size``, centre crop) and
the first ``--public_size`` of a seeded order are used. Every worker and node loads the same set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedward.data.imagecache import decode_images, decoded_cache_dir
from fedward.data.types import Split
from fedward.errors import ConfigError, DataError
from fedward.options import at_least, option
from fedward.seeding import torch_generator

UNLABELLED = -1


@dataclass
class PublicData:
    public_data: str | None = option(None, "folder of public images: <dir>/<class>/<image> (labelled, class folders "
                                           "named like the data set's) or images anywhere below it (unlabelled); "
                                           "default: the data set's built-in public split")
    public_size: int = option(1200, "public images used (the first of a seeded order)", check=at_least(2))


def _images_below(folder: Path) -> list[Path]:
    from fedward.data.folders import IMAGE_EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_public_folder(folder: str | Path, class_names: list[str], image_size: int, *, progress: bool = False) -> Split:
    """The images under ``folder``: labelled by class folder, or unlabelled (see the module docstring)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--public_data {folder}: not a folder")
    class_folders = [folder / name for name in class_names if (folder / name).is_dir()]
    if class_folders:
        paths, labels = [], []
        for path in _images_below(folder):
            top = path.relative_to(folder).parts[0]
            if top not in class_names or len(path.relative_to(folder).parts) < 2:
                raise DataError(f"--public_data {folder}: {path} is not in a class folder; with class folders "
                                f"({', '.join(p.name for p in class_folders)}) every image must be in one of "
                                f"{', '.join(class_names)}")
            paths.append(path)
            labels.append(class_names.index(top))
    else:
        paths = _images_below(folder)
        labels = [UNLABELLED] * len(paths)
    if len(paths) < 2:
        raise DataError(f"--public_data {folder}: {len(paths)} image(s) found; expected at least 2")
    decoded = decode_images(paths, image_size, cache_dir=decoded_cache_dir(), progress=progress)
    return Split(decoded.images, torch.tensor(labels, dtype=torch.int64))


def load_public(cfg, class_names: list[str], *, labelled: bool) -> Split:
    """The run's public set (``labelled``: the method needs its labels, so an unlabelled folder is an error)."""
    from fedward.data.registry import get_dataset

    if cfg.public_data:
        split = read_public_folder(cfg.public_data, class_names, cfg.image_size, progress=cfg.progress)
        split = split.subset(torch.randperm(len(split), generator=torch_generator(cfg.seed, "public-order"))[:cfg.public_size])
    else:
        entry = get_dataset(cfg.dataset)
        if entry.public is None:
            raise ConfigError(f"--method {cfg.method} needs public data and --dataset {cfg.dataset} has no built-in "
                              f"public split; give a folder of images with --public_data DIR")
        split = entry.public(cfg, cfg.public_size)
    if labelled and bool((split.labels == UNLABELLED).any()):
        raise ConfigError(f"--method {cfg.method} needs labelled public data; --public_data {cfg.public_data} has no "
                          f"class folders named like the data set's classes ({', '.join(class_names)})")
    return split
