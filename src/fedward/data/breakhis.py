"""BreakHis (breast-tumour histopathology) as four clients at x1, x2, x4 and x8 resolution, as in
MH-pFLID (ICML 2024).

Layout read (the public ``BreaKHis_v1`` archive, unpacked; fedward downloads nothing)::

    <data_dir>/BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/<patient>/<magnification>/<image>.png

``data_dir`` may be the folder holding ``BreaKHis_v1``, ``BreaKHis_v1`` itself or
``histology_slides``. The facts the loader relies on and checks:

* subtype folders: benign ``adenosis``, ``fibroadenoma``, ``phyllodes_tumor``, ``tubular_adenoma``;
  malignant ``ductal_carcinoma``, ``lobular_carcinoma``, ``mucinous_carcinoma``,
  ``papillary_carcinoma`` (an unknown or misplaced subtype folder is an error);
* a patient folder (e.g. ``SOB_B_A_14-22549AB``) is one patient; it holds ``40X``, ``100X``,
  ``200X`` and ``400X`` folders (another magnification folder is an error);
* file names ``SOB_<B|M>_<code>-<year>-<slide id>-<magnification>-<sequence>.png`` (e.g.
  ``SOB_B_A-14-22549AB-40-001.png``), codes A, F, PT, TA, DC, LC, MC, PC for the subtypes above:
  the B/M letter and the code must agree with the folders the file sits in;
* the full set: 82 patient folders, 7,909 RGB PNGs of 700 x 460 px (2,480 benign, 5,429 malignant).

Labels: ``binary`` (benign/malignant, MH-pFLID's task) or ``subtype`` (the eight subtypes,
``synthetic_multires.SUBTYPE_NAMES`` order). Every image is decoded once, resized to a square
``image_size`` x ``image_size`` (bicubic, the whole image, aspect ratio ignored, as the MH-pFLID
reproduction does; fedward's other loaders keep the aspect and centre-crop instead), into the
image cache (``fedward.data.imagecache``). Client k's images are those x1 images degraded by
``synthetic_multires.degrade`` with factor 1, 2, 4 or 8 (area-downsample, resize back).

Two settings, as in ``synthetic_multires``:

* ``shared_images=False`` (default, patient-disjoint): patients are dealt to the four clients,
  stratified by subtype and seeded, so no patient is at two clients; each client splits its own
  patients 70/30 into train/test, grouped and stratified by the binary label.
* ``shared_images=True`` (the MH-pFLID reproduction's data): every client holds every image at its
  own resolution, with one grouped 70/30 split for all clients; ``split_per_client=True`` gives
  each client its own split drawn from ``REPRODUCTION_SPLIT_SEEDS`` as the reproduction does,
  which leaks test patients across clients through the shared model (it warns).

Validation groups are carved, grouped and stratified, from each client's train groups. The group
is the patient folder (``group_by="patient"``, default) or, to reproduce the reproduction,
the patient folder and magnification (``group_by="patient_magnification"``: one patient's images
at different magnifications can then fall in train and in test; it warns). Clients are always
dealt whole patients. ``info["patients"][k][split]`` gives the patient index of every image
(``info["patient_names"]`` maps it to the folder name) and ``info["magnification_ids"][k][split]``
its magnification (an index into ``info["magnifications"]``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedward.data.folders import IMAGE_EXTENSIONS
from fedward.data.imagecache import decode_splits
from fedward.data.synthetic_multires import (
    BINARY_NAMES,
    CLIENT_NAMES,
    DOWNSAMPLING,
    NUM_BENIGN_SUBTYPES,
    NUM_CLIENTS,
    SPLITS,
    SUBTYPE_NAMES,
    check_split_options,
    client_patients,
    deal_patients,
    degrade,
    shared_image_splits,
)
from fedward.data.types import ClientData, FederatedData, Split
from fedward.errors import ConfigError, DataError
from fedward.seeding import numpy_generator
from fedward.data.registry import BreakHisLabels, ImageFiles, register_dataset
from fedward.options import option

NAME = "breakhis"
NUM_CLASSES = 2
CLASS_NAMES = list(BINARY_NAMES)
__all__ = ["CLASS_NAMES", "CLIENT_NAMES", "NAME", "NUM_CLASSES", "NUM_CLIENTS", "load", "scan"]

MAGNIFICATIONS = ("40X", "100X", "200X", "400X")
GROUP_CHOICES = ("patient", "patient_magnification")
TREE = ("histology_slides", "breast")
EXPECTED = "BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/<patient>/<magnification>/<image>.png"
# File-name subtype codes, in SUBTYPE_NAMES order.
SUBTYPE_CODES = ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")
CLASS_LETTERS = {"benign": "B", "malignant": "M"}
FILE_NAME = re.compile(r"SOB_([A-Za-z]+)_([A-Za-z]+)-")
PREPROCESS = "square"  # imagecache: the whole image to image_size x image_size, aspect ignored
DEGRADE_CHUNK = 256  # images degraded at a time (bounds the float buffers at 224 px)
MAX_LISTED = 20


def find_root(data_dir: Path) -> Path:
    """``<...>/histology_slides/breast`` below ``data_dir`` (the parent of ``BreaKHis_v1``,
    ``BreaKHis_v1`` itself or ``histology_slides``)."""
    for candidate in (data_dir / "BreaKHis_v1" / Path(*TREE), data_dir / Path(*TREE), data_dir / TREE[1]):
        if candidate.is_dir():
            return candidate
    state = "does not exist" if not data_dir.is_dir() else "holds no histology_slides/breast folder"
    raise DataError(f"BreakHis data folder {data_dir} {state}; expected {data_dir}/{EXPECTED} "
                    f"(data_dir may also be BreaKHis_v1 or histology_slides)")  # fmt: skip


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_file_name(path: Path, letter: str, code: str) -> None:
    match = FILE_NAME.match(path.name)
    if match is None or match.group(1) != letter or match.group(2) != code:
        raise DataError(f"BreakHis file {path}: its name does not agree with its folders; expected a name starting "
                        f"SOB_{letter}_{code}- (SOB_<B|M>_<subtype code>-<year>-<slide id>-<magnification>-<sequence>.png)")  # fmt: skip


def scan(root: Path, magnifications: tuple[str, ...]) -> list[tuple[Path, str, int, str]]:
    """(image file, patient folder name, subtype index, magnification) of every image under
    ``root`` (= ``.../histology_slides/breast``) at one of ``magnifications``, in path order."""
    records = []
    for class_dir in _subfolders(root):
        if class_dir.name not in CLASS_LETTERS:
            raise DataError(f"unknown BreakHis class folder {class_dir}; expected benign or malignant")
        benign = class_dir.name == "benign"
        allowed = SUBTYPE_NAMES[:NUM_BENIGN_SUBTYPES] if benign else SUBTYPE_NAMES[NUM_BENIGN_SUBTYPES:]
        sob = class_dir / "SOB"
        if not sob.is_dir():
            raise DataError(f"BreakHis class folder {class_dir} has no SOB folder; expected {sob}/<subtype>/<patient>/<magnification>/<image>.png")
        for subtype_dir in _subfolders(sob):
            if subtype_dir.name not in allowed:
                raise DataError(f"unknown BreakHis subtype folder {subtype_dir}; expected one of {', '.join(allowed)} under {class_dir.name}")
            subtype = SUBTYPE_NAMES.index(subtype_dir.name)
            for patient_dir in _subfolders(subtype_dir):
                for magnification_dir in _subfolders(patient_dir):
                    if magnification_dir.name not in MAGNIFICATIONS:
                        raise DataError(f"unknown BreakHis magnification folder {magnification_dir}; expected one of {', '.join(MAGNIFICATIONS)}")
                    if magnification_dir.name not in magnifications:
                        continue
                    for path in sorted(magnification_dir.iterdir()):
                        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS or path.is_dir():
                            continue
                        _check_file_name(path, CLASS_LETTERS[class_dir.name], SUBTYPE_CODES[subtype])
                        records.append((path, patient_dir.name, subtype, magnification_dir.name))
    return records


def _check_arguments(image_size, magnifications, labels, shared_images, split_per_client, group_by,
                     val_fraction) -> tuple[str, ...]:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8, got {image_size!r}")
    if isinstance(magnifications, str):
        magnifications = (magnifications,)
    magnifications = tuple(str(m).upper() for m in magnifications)
    unknown = [m for m in magnifications if m not in MAGNIFICATIONS]
    if not magnifications or unknown or len(set(magnifications)) != len(magnifications):
        raise ConfigError(f"magnifications must be distinct values among {', '.join(MAGNIFICATIONS)}, got {magnifications!r}")
    check_split_options(labels, shared_images, val_fraction, split_per_client)
    if group_by not in GROUP_CHOICES:
        raise ConfigError(f"group_by must be one of {', '.join(GROUP_CHOICES)}, got {group_by!r}")
    return tuple(m for m in MAGNIFICATIONS if m in magnifications)


def _degrade_rows(x1: torch.Tensor, rows: torch.Tensor, factor: int) -> torch.Tensor:
    """``degrade(x1[rows], factor)``, a chunk at a time."""
    out = torch.empty((len(rows), *x1.shape[1:]), dtype=torch.uint8)
    for start in range(0, len(rows), DEGRADE_CHUNK):
        stop = start + DEGRADE_CHUNK
        out[start:stop] = degrade(x1[rows[start:stop]], factor)
    return out


def load(
    *,
    data_dir: str | Path,
    image_size: int = 224,
    magnifications: tuple[str, ...] | list[str] | str = MAGNIFICATIONS,
    labels: str = "binary",
    shared_images: bool = False,
    split_per_client: bool = False,
    group_by: str = "patient",
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_bad_images: bool = False,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> FederatedData:
    """Load BreakHis from ``data_dir`` as four clients at x1/x2/x4/x8 (see the module docstring).

    Images that cannot be read raise ``DataError`` naming them, unless ``skip_bad_images`` (then
    they are left out and counted in ``info["skipped_bad_images"]``).
    """
    magnifications = _check_arguments(image_size, magnifications, labels, shared_images, split_per_client, group_by,
                                      val_fraction)
    if group_by == "patient_magnification":
        warnings.warn(f"{NAME}: group_by='patient_magnification' groups images by patient folder and magnification, as the "
                      f"MH-pFLID reproduction does: one patient's images at different magnifications can fall in both "
                      f"train and test of a client", UserWarning, stacklevel=2)  # fmt: skip
    data_dir = Path(data_dir).expanduser()
    root = find_root(data_dir)
    records = scan(root, magnifications)
    if not records:
        raise DataError(f"no BreakHis image at magnification {', '.join(magnifications)} under {root}; expected {data_dir}/{EXPECTED}")

    # Decode once, in path order, through the image cache.
    listing = {"all": [(path, subtype) for path, _, subtype, _ in records]}
    parts, decoded = decode_splits(listing, ["all"], image_size, cache_dir=cache_dir, skip_bad=skip_bad_images,
                                   progress=progress, preprocess=PREPROCESS)  # fmt: skip
    x1 = parts["all"].images
    kept = [records[i] for i in decoded.kept]
    if not kept:
        raise DataError(f"no readable BreakHis image under {root} after skipping {len(decoded.bad)} unreadable image(s)")

    # Patients (folder names, sorted) and groups (patient, or patient and magnification).
    subtype_of: dict[str, int] = {}
    for path, patient, subtype, _ in records:
        if subtype_of.setdefault(patient, subtype) != subtype:
            raise DataError(f"BreakHis patient folder {patient} appears under both {SUBTYPE_NAMES[subtype_of[patient]]} and "
                            f"{SUBTYPE_NAMES[subtype]} ({path}); expected each patient folder name once")  # fmt: skip
    patient_names = sorted(subtype_of)
    patient_index = {name: i for i, name in enumerate(patient_names)}
    patient_subtypes = np.array([subtype_of[name] for name in patient_names], dtype=np.int64)
    image_patient = np.array([patient_index[patient] for _, patient, _, _ in kept], dtype=np.int64)
    image_magnification = np.array([magnifications.index(m) for _, _, _, m in kept], dtype=np.int64)
    image_subtype = np.array([subtype for _, _, subtype, _ in kept], dtype=np.int64)
    if group_by == "patient":
        image_group = image_patient
    else:
        image_group = image_patient * len(magnifications) + image_magnification
    groups = np.unique(image_group)
    group_binary = np.zeros(int(groups.max()) + 1, dtype=np.int64)
    group_binary[image_group] = (image_subtype >= NUM_BENIGN_SUBTYPES).astype(np.int64)
    group_patient = np.zeros_like(group_binary)
    group_patient[image_group] = image_patient

    if shared_images:
        splits = shared_image_splits(groups, group_binary, val_fraction, seed, NAME, split_per_client=split_per_client)
    else:
        present = np.unique(image_patient)
        owners = [present[np.isin(present, dealt)] for dealt in
                  deal_patients(patient_subtypes, numpy_generator(seed, NAME, "clients"))]  # fmt: skip
        splits = [client_patients(groups[np.isin(group_patient[groups], owned)], group_binary, val_fraction, seed, NAME, client)
                  for client, owned in enumerate(owners)]  # fmt: skip

    labels_of = torch.from_numpy(image_subtype if labels == "subtype" else image_subtype // NUM_BENIGN_SUBTYPES)
    clients, patients_info, magnification_info = [], [], []
    for client, parts_k in enumerate(splits):
        built, patients_k, magnifications_k = {}, {}, {}
        for split in SPLITS:
            rows = torch.from_numpy(np.flatnonzero(np.isin(image_group, parts_k[split])))
            built[split] = Split(_degrade_rows(x1, rows, DOWNSAMPLING[client]), labels_of[rows].clone())
            patients_k[split] = image_patient[rows.numpy()].tolist()
            magnifications_k[split] = image_magnification[rows.numpy()].tolist()
        for split in ("train", "test"):
            if len(built[split]) == 0:
                raise DataError(f"{NAME}: client {client} ({CLIENT_NAMES[client]}) has no {split} images: too few patients "
                                f"under {root} for four clients (each needs at least two patients of one class)")  # fmt: skip
        clients.append(ClientData(client, CLIENT_NAMES[client], built["train"], built["val"], built["test"]))
        patients_info.append(patients_k)
        magnification_info.append(magnifications_k)

    class_names = list(SUBTYPE_NAMES) if labels == "subtype" else list(BINARY_NAMES)

    def table(split: str) -> list[list[int]]:
        return [getattr(c, split).class_counts(len(class_names)).tolist() for c in clients]

    bad = [f"{path} ({reason})" for path, reason in decoded.bad[:MAX_LISTED]]
    if bad:
        warnings.warn(f"{NAME}: skipped {len(decoded.bad)} unreadable image(s) under {root} (first: {bad[0]})",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
    info = {
        "source": NAME,
        "layout": "breakhis",
        "data_dir": str(data_dir),
        "root": str(root),
        "cache_file": str(decoded.cache_file) if decoded.cache_file else None,
        "skipped_bad_images": len(decoded.bad),
        "bad_images": bad,
        "image_size": image_size,
        "preprocess": "square resize (aspect ratio ignored)",
        "magnifications": list(magnifications),
        "labels": labels,
        "shared_images": shared_images,
        "split_per_client": split_per_client,
        "group_by": group_by,
        "val_fraction": val_fraction,
        "seed": seed,
        "downsampling": list(DOWNSAMPLING),
        "counts": {split: table(split) for split in SPLITS},
        "num_images": len(kept),
        "num_patients": len(np.unique(image_patient)),
        "patient_names": patient_names,
        "patient_subtypes": patient_subtypes.tolist(),
        "patients": patients_info,
        "magnification_ids": magnification_info,
    }
    return FederatedData(NAME, len(class_names), class_names, image_size, clients, info=info)


@dataclass
class Options(BreakHisLabels, ImageFiles):
    magnifications: list[str] = option(factory=lambda: list(MAGNIFICATIONS),
                                       help="magnifications to read (default all four, pooled, as the reproduction)")
    group_by: str = option("patient", "split grouping, patient (default) or patient_magnification (the reproduction's, "
                                      "which lets a patient be in train and test at different magnifications)",
                           choices=("patient", "patient_magnification"))


@register_dataset(NAME, options=Options, needs_data_dir=True, partitionable=False, splits_clients=True)
def from_config(cfg) -> FederatedData:
    """BreakHis from --data_dir: 4 clients at x1/x2/x4/x8"""
    return load(data_dir=cfg.data_dir, image_size=cfg.image_size, magnifications=cfg.magnifications,
                labels=cfg.label_set, shared_images=cfg.shared_images, split_per_client=cfg.split_per_client, group_by=cfg.group_by,
                val_fraction=cfg.val_fraction, seed=cfg.data_seed, skip_bad_images=cfg.skip_bad_images,
                progress=cfg.progress)
